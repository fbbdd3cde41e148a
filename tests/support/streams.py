"""Inputs a stream decoder must not care about: the same bytes cut at every possible place."""

from __future__ import annotations

import itertools
from collections.abc import Iterator


def every_split(data: bytes) -> Iterator[list[bytes]]:
    """``data`` whole, cut in two at every byte, and fed one byte at a time."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def cut_at(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (for hypothesis-chosen split points)."""
    bounds = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
