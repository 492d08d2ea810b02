"""Every page of a List call: the CLI's list commands show all results, not the first page."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def every_page(list_rpc: Callable[[Any], Any], request: Any, items: str) -> list[Any]:
    """Call `list_rpc(request)` following `next_page_token`; the `items` of every page.

    >>> from types import SimpleNamespace as NS
    >>> pages = {"": NS(jobs=[1, 2], next_page_token="b"), "b": NS(jobs=[3], next_page_token="")}
    >>> every_page(lambda r: pages[r.page_token], NS(page_token=""), "jobs")
    [1, 2, 3]
    """
    found: list[Any] = []
    while True:
        response = list_rpc(request)
        found.extend(getattr(response, items))
        if not response.next_page_token:
            return found
        request.page_token = response.next_page_token


async def every_page_async(
    list_rpc: Callable[[Any], Awaitable[Any]], request: Any, items: str
) -> Sequence[Any]:
    """`every_page` for an asyncio stub."""
    found: list[Any] = []
    while True:
        response = await list_rpc(request)
        found.extend(getattr(response, items))
        if not response.next_page_token:
            return found
        request.page_token = response.next_page_token
