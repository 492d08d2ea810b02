"""Python times -> google.protobuf.Timestamp, for every service's conversion module."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2


def to_timestamp(value: datetime | float) -> timestamp_pb2.Timestamp:
    """A datetime (aware, or naive UTC) or Unix seconds as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, datetime):
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(value * 1e9))
    return ts


def to_timestamp_or_none(value: datetime | float | None) -> timestamp_pb2.Timestamp | None:
    """None stays None, so an unset time leaves its field unset."""
    return None if value is None else to_timestamp(value)
