"""Opaque page tokens: base64 of the position plus a hash of the query, so a token used with a
different filter is refused instead of returning a silently wrong page."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from services.common.errors import field_error

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise field_error("page_size", "must be >= 0")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _query_hash(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(position: Any, query: Any) -> str:
    raw = json.dumps({"p": position, "q": _query_hash(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: Any) -> Any:
    """The position inside `token`, or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position, qhash = data["p"], data["q"]
    except (ValueError, KeyError, TypeError) as exc:
        raise field_error("page_token", "not a token returned by this list method") from exc
    if qhash != _query_hash(query):
        raise field_error("page_token", "was issued for a different filter; start from page one")
    return position
