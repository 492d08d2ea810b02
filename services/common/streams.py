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

    current: list[asyncio.Future[object]] = []

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            current[:] = [asyncio.ensure_future(asyncio.to_thread(handle, item))]
            await current[0]

    async def put(item: T | None) -> bool:
        """Queue `item` unless the worker has stopped; True if it was queued."""
        putting = asyncio.ensure_future(queue.put(item))
        await asyncio.wait({putting, task}, return_when=asyncio.FIRST_COMPLETED)
        if putting.done():
            return True
        putting.cancel()
        return False

    task = asyncio.create_task(worker())
    try:
        async for item in source:
            if not await put(item):
                break
        else:
            await put(None)
        await task  # re-raises the worker's error, if any
    finally:
        task.cancel()
        # A write already running in its thread cannot be interrupted: let it finish before
        # the caller cleans up what it writes to.
        if current:
            await asyncio.gather(asyncio.shield(current[0]), return_exceptions=True)


async def produce_prefetched(blocks: Iterator[T]) -> AsyncIterator[T]:
    """Yield from a blocking iterator, reading the next item in a thread while this one is used."""
    pending = asyncio.ensure_future(asyncio.to_thread(next, blocks, None))
    try:
        while (item := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, blocks, None))
            yield item
    finally:
        pending.cancel()
