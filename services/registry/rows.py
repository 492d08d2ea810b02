"""Reading a dataset revision's rows: a shard of them, a window, in order or in a seeded shuffle
every shard computes alike. Streams from the blob store; never the whole file in memory."""

from __future__ import annotations

import array
import functools
import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from services.common.errors import FieldViolation, InvalidArgument
from services.registry.blobs import BlobStore
from services.registry.domain import RowQuery


def lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a stream of byte blocks, without their newlines.

    >>> list(lines([b"a\\nb", b"c\\n", b"d"]))
    [b'a', b'bc', b'd']
    """
    rest = b""
    for block in blocks:
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def check_row_query(query: RowQuery) -> int:
    """The shard count a query means (0 is 1); InvalidArgument naming a bad field."""
    count = query.shard_count or 1
    if count < 1 or not 0 <= query.shard_index < count:
        raise InvalidArgument(
            f"shard_index must be in [0, {count})",
            violations=[FieldViolation("shard_index", f"must be in [0, shard_count={count})")],
        )
    if query.offset < 0 or query.limit < 0:
        field = "offset" if query.offset < 0 else "limit"
        raise InvalidArgument(
            "offset and limit must be >= 0", violations=[FieldViolation(field, "must be >= 0")]
        )
    return count


class RowReader:
    """Rows of the dataset blobs in one blob store. Blobs are immutable, so a blob's line offsets
    are computed once: readers that page through a shuffled revision (GRPO reads a batch per
    step) do not rescan the file."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self._line_offsets = functools.lru_cache(maxsize=16)(self._scan_line_offsets)

    def _scan_line_offsets(self, key: str) -> array.array[int]:
        """Byte offsets of each line start, plus the end (8 bytes per row)."""
        offsets = array.array("Q", [0])
        with self.blobs.local_copy(key).open("rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        return offsets

    def rows(self, key: str, query: RowQuery, count: int) -> Iterator[tuple[int, bytes]]:
        """This shard's (row index, JSON line) pairs of the blob `key`."""
        stop = query.offset + query.limit if query.limit else None
        if not query.shuffle:
            mine = (
                (i, line)
                for i, line in enumerate(lines(self.blobs.read(key)))
                if i % count == query.shard_index
            )
            yield from itertools.islice(mine, query.offset, stop)
            return
        # A seeded permutation every shard computes alike, then seeks to each of its rows.
        path = self.blobs.local_copy(key)
        offsets = self._line_offsets(key)
        order = np.random.default_rng(query.shuffle_seed).permutation(len(offsets) - 1)
        with path.open("rb") as f:
            for index in order[query.shard_index :: count][query.offset : stop]:
                f.seek(offsets[index])
                yield int(index), f.read(offsets[index + 1] - offsets[index]).rstrip(b"\n")
