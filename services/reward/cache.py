"""LRU cache of deterministic scorer outcomes, keyed by a content hash."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

from services.reward.domain import Outcome, Sample, Status
from tlm.reward.v1 import evaluator_pb2 as ev

CACHEABLE = {Status.OK, Status.UNSCORABLE}


def sample_digest(sample: Sample) -> bytes:
    """Hash of what a rule may read in a sample: completion, metadata and token ids. Computed
    once per sample and call, whatever the number of rule scorers."""
    digest = hashlib.sha256(sample.completion.encode())
    digest.update(b"\0" + json.dumps(sample.metadata, sort_keys=True, default=str).encode())
    digest.update(b"\0" + ",".join(map(str, sample.token_ids)).encode())
    return digest.digest()


def content_keys(scorer: ev.ScorerSpec, digests: Sequence[bytes], team: str) -> list[str]:
    """Hash of what decides a rule's outcome: its type and parameters and the sample's content
    (`sample_digest`), within one team. Name, weight and normalisation are left out: they apply
    after the cache.

    The team is part of the key: a hit shared between teams (`cached` in the result, and its
    latency) would tell one team that another scored this exact completion and reference."""
    if not digests:
        return []
    kind = scorer.WhichOneof("scorer") or ""
    prefix = hashlib.sha256(team.encode() + b"\0" + kind.encode())
    prefix.update(getattr(scorer, kind).SerializeToString(deterministic=True) + b"\0")
    keys = []
    for digest in digests:
        key = prefix.copy()
        key.update(digest)
        keys.append(key.hexdigest())
    return keys


def content_key(scorer: ev.ScorerSpec, sample: Sample, team: str) -> str:
    """`content_keys` of one sample."""
    return content_keys(scorer, [sample_digest(sample)], team)[0]


class OutcomeCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        # Disabled, it computes no keys: hashing a sample costs about what a cheap rule does.
        self.enabled = max_entries > 0
        self._items: OrderedDict[str, Outcome] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Outcome | None:
        with self._lock:
            outcome = self._items.get(key)
            if outcome is not None:
                self._items.move_to_end(key)
            return outcome

    def put(self, key: str, outcome: Outcome) -> None:
        if outcome.status not in CACHEABLE or self.max_entries <= 0:
            return
        with self._lock:
            self._items[key] = outcome
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
