"""The shuffle control's data half: the same records answered on other records' images.

``main.py predict|test --data.init_args.shuffle_images SEED`` gives every record the image of another image
group (``shuffle_images``); ``radvlm_tools.shuffle_control`` and ``radvlm_tools.evaluate --shuffled`` score
the two prediction sets against each other. Not in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of ``0 … n−1`` with ``perm[i] != i`` for every i; (n,) int64.

    ``n`` must be at least 2 (one element cannot move). Same ``seed`` → same permutation."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    while True:  # P(no fixed point) → 1/e: rejection is exact and cheap
        perm = rng.permutation(n)
        if not np.any(perm == idx):
            return perm


def shuffle_images(records: Sequence[Any], seed: int) -> list[Any]:
    """Records (``datamodules.records.Record``) with images deranged among the distinct images.

    Images are ordered by first appearance; image group k gets the image of group ``perm[k]``. Records without
    an image are kept unchanged. Each returned record carries ``extra["own_image"]`` (its original image) and
    ``extra["shuffle_seed"]``."""
    images: list[str] = []
    seen: set[str] = set()
    for r in records:
        if r.image is not None and str(r.image) not in seen:
            seen.add(str(r.image))
            images.append(str(r.image))
    if len(images) < 2:
        raise ValueError(f"the shuffle control needs records of at least 2 distinct images, got {len(images)}")
    perm = derangement(len(images), seed)
    other = {images[k]: images[int(perm[k])] for k in range(len(images))}
    out = []
    for r in records:
        if r.image is None:
            out.append(r)
            continue
        extra = {**r.extra, "own_image": str(r.image), "shuffle_seed": int(seed)}
        out.append(replace(r, image=Path(other[str(r.image)]), extra=extra))
    return out
