#!/usr/bin/env python3
"""Merge overlapping intervals and report the total covered length."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, List


@dataclass(frozen=True)
class Interval:
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"bad interval [{self.start}, {self.end})")


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    out: List[Interval] = []
    for iv in sorted(intervals, key=lambda i: (i.start, i.end)):
        if out and iv.start <= out[-1].end:
            last = out.pop()
            out.append(Interval(last.start, max(last.end, iv.end)))
        else:
            out.append(iv)
    return out


def main(argv: list[str]) -> int:
    ivs = [Interval(*map(int, a.split(":"))) for a in argv[1:]]
    merged = merge(ivs)
    total = sum(i.end - i.start for i in merged)
    print(f"{len(merged)} intervals, {total} covered", file=sys.stderr)
    return 0 if merged else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
