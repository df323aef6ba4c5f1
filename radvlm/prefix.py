"""Rows that share a prompt: which image each row shows and which rows have one prompt (tokens, mask, image).

``Policy.shared_prefix_hidden_states`` computes every distinct prompt (``prefix_groups``) once and copies its KV
cache to the rows that share it (PrefixGrouper's idea), for the log-prob passes without gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from radvlm.batch import image_blocks


def row_image_ids(batch: dict[str, Any]) -> torch.Tensor | None:  # (N,)
    """Which image each row shows, as equal ids for equal images: ``image_index`` in the rollout layout (rows
    share distinct images); with one image block per row (``pixel_values``), rows whose blocks are equal get the
    id of the first of them; ``None`` without images."""
    if batch.get("image_index") is not None:
        return batch["image_index"]
    if batch.get("pixel_values") is None:
        return None
    blocks = image_blocks(batch)
    ids: list[int] = []
    for i, block in enumerate(blocks):
        ids.append(next((j for j in range(i) if ids[j] == j and blocks[j].shape == block.shape
                         and torch.equal(blocks[j], block)), i))
    return torch.tensor(ids, device=batch["input_ids"].device)


def prefix_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # (U,), (N,)
    """Rows with one prompt: ``(first, inverse)``, the first row of each distinct prompt in order of first
    appearance, and for every row the position of its prompt in ``first``. Two rows share a prompt when their
    attended tokens, their attention masks (``(N, P)``) and their image (``image_index`` (N,), the rollout
    layout; ``None``: no images, or one per row) are equal. Example: ids [[0, 5, 6], [0, 5, 6], [4, 5, 6]],
    masks [[0, 1, 1], [0, 1, 1], [1, 1, 1]] → first [0, 2], inverse [0, 0, 1]."""
    key = torch.cat([prompt_ids * prompt_mask, prompt_mask.to(prompt_ids.dtype)], dim=1)  # (N, 2P)
    if image_index is not None:
        key = torch.cat([key, image_index.to(key.device, key.dtype).unsqueeze(1)], dim=1)  # (N, 2P + 1)
    _, groups = torch.unique(key, dim=0, return_inverse=True)  # (N,) ids in sorted order of the keys
    n = key.shape[0]
    order = torch.arange(n, device=key.device)
    firsts = torch.full((int(groups.max()) + 1,), n, device=key.device).scatter_reduce(0, groups, order, "amin")
    rank = torch.argsort(torch.argsort(firsts))  # (U,): sorted-key id → order of first appearance
    return firsts[torch.argsort(firsts)], rank[groups]

