"""Overlap disk work with network work in streaming RPCs: while one chunk is written (or read)
in a worker thread, the next one is already being received (or sent)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


async def consume_pipelined(
    source: AsyncIterable[T], handle: Callable[[T], object], depth: int = 4
) -> None:
    """Call `handle(item)` in a worker thread for each item, receiving ahead up to `depth`."""
    queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize=depth)

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            await asyncio.to_thread(handle, item)

    task = asyncio.create_task(worker())
    try:
        async for item in source:
            put = asyncio.ensure_future(queue.put(item))
            await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                put.cancel()
                break
        else:
            await queue.put(None)
        await task  # re-raises the worker's error, if any
    finally:
        task.cancel()


async def produce_prefetched(blocks: Iterator[T]) -> AsyncIterator[T]:
    """Yield from a blocking iterator, reading the next item in a thread while this one is used."""
    pending = asyncio.ensure_future(asyncio.to_thread(next, blocks, None))
    try:
        while (item := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, blocks, None))
            yield item
    finally:
        pending.cancel()
