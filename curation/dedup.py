"""Duplicates across the whole dataset: repeated source ids, and perceptual near-duplicates (pHash + Hamming).

Decisions are deterministic so that a resumed job makes exactly the same ones: of samples sharing a key, the first
in (unit, ordinal) order is kept; of perceptual near-duplicates, samples are visited best first (most pixels, then
a still picture before an animated one, then the key) and each is rejected when a kept sample lies within
`max_distance` bits (greedy leader clustering, so the best sample of a group survives: the 1500x1000 original, not
its 600x400 GIF copy). The Hamming search uses multi-index hashing, not all pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import imagehash
import numpy as np
from PIL import Image

from curation.sources.base import Rejection


def phash_int(image: Image.Image, hash_size: int = 8) -> int:
    """The perceptual hash (DCT of a hash_size*4 grey thumbnail vs its median) as an int of hash_size**2 bits."""
    bits = np.asarray(imagehash.phash(image, hash_size=hash_size).hash, dtype=bool).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big") >> (-len(bits) % 8)


class HammingIndex:
    """Multi-index hashing: split each `bits`-bit code into radius + 1 substrings; by the pigeonhole principle two
    codes within `radius` bits agree exactly on at least one substring, so only codes sharing a substring with the
    query are compared in full."""

    def __init__(self, bits: int = 64, radius: int = 4):
        if not 0 <= radius < bits:
            raise ValueError(f"radius must be in [0, {bits}), got {radius}")
        self.radius = radius
        chunks = radius + 1
        edges = [round(i * bits / chunks) for i in range(chunks + 1)]
        self._masks = [(((1 << (hi - lo)) - 1) << lo, lo) for lo, hi in zip(edges, edges[1:])]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._masks]
        self._codes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def add(self, code: int, item: int) -> None:
        self._codes[item] = code
        for table, (mask, shift) in zip(self._tables, self._masks):
            table.setdefault((code & mask) >> shift, []).append(item)

    def query(self, code: int) -> list[tuple[int, int]]:
        """(item, distance) of every stored code within `radius` bits of `code`."""
        candidates: set[int] = set()
        for table, (mask, shift) in zip(self._tables, self._masks):
            candidates.update(table.get((code & mask) >> shift, ()))
        found = []
        for item in candidates:
            distance = (code ^ self._codes[item]).bit_count()
            if distance <= self.radius:
                found.append((item, distance))
        return found


@dataclass(frozen=True, slots=True)
class Candidate:
    """A sample that passed the cheap filters, as the duplicate search sees it."""

    unit: str
    unit_rank: int  # position of its unit in the job's sorted unit list
    ordinal: int
    key: str
    source_id: str
    phash: int | None
    pixels: int = 0  # height x width of the original
    animated: bool = False

    def rank(self) -> tuple:
        """Best first: most pixels, then still over animated, then the key."""
        return -self.pixels, self.animated, self.key


def find_duplicates(samples: Sequence[Candidate], max_distance: int | None, bits: int = 64) -> dict[int, Rejection]:
    """Index into `samples` -> why it is a duplicate. `max_distance=None` checks repeated ids only."""
    rejected: dict[int, Rejection] = {}
    first: dict[str, int] = {}
    for index in sorted(range(len(samples)), key=lambda i: (samples[i].unit_rank, samples[i].ordinal)):
        sample = samples[index]
        if sample.key in first:
            earlier = samples[first[sample.key]]
            rejected[index] = Rejection("duplicate_id", f"source id {sample.source_id!r} repeats record "
                                        f"{earlier.ordinal} of unit {earlier.unit}, which is kept")
        else:
            first[sample.key] = index
    if max_distance is None:
        return rejected
    index_ = HammingIndex(bits, max_distance)
    for index in sorted(first.values(), key=lambda i: samples[i].rank()):
        code = samples[index].phash
        if code is None:
            continue
        matches = index_.query(code)
        if matches:
            kept, distance = min(matches, key=lambda m: (m[1], samples[m[0]].rank()))
            rejected[index] = Rejection("near_duplicate", f"pHash within {distance} bits of {samples[kept].key} "
                                        f"(max_distance {max_distance})")
        else:
            index_.add(code, index)
    return rejected
