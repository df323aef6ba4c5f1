"""Row operations on collated model batches, in one place: repeat, select, concatenate, append completions.

A batch is a dict of ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (N, T) and the image tensors
``pixel_values`` (patches, D), the patches of every image back to back, and ``image_grid_thw`` (images, 3).
Every function here assumes one image per row (the RadVLM tasks), so row ``i`` owns image block ``i``; lists
(ids, targets, tasks …) are carried row by row where a function says so. Rows of a rollout are grouped
contiguously: prompt ``i`` → rows ``i·G … i·G+G−1`` (DESIGN.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def image_blocks(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The patches of each image of ``batch`` (one tensor per image, in row order)."""
    return torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())


def repeat_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Repeat every sample of a collated batch ``n`` times, contiguously (sample i → rows i·n … i·n+n−1).

    ``pixel_values`` holds the patches of all images back to back, so it is repeated per image block; list
    values are repeated element by element, other values kept.
    """
    if n == 1:
        return dict(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "pixel_values" or not isinstance(value, torch.Tensor):
            continue
        out[key] = value.repeat_interleave(n, dim=0)  # (N*n, ...)
    if batch.get("pixel_values") is not None:
        out["pixel_values"] = torch.cat([b for b in image_blocks(batch) for _ in range(n)])  # (patches*n, D)
        # image_grid_thw was repeated above: valid because each sample carries exactly one image
        if "image_counts" in batch:
            counts = batch["image_counts"]
            if not bool((counts == 1).all()):
                raise ValueError("repeat_batch supports one image per sample")
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) and key not in out:
            out[key] = [v for v in value for _ in range(n)] if isinstance(value, list) else value
    return out


def select_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows ``rows`` of a model batch (one image per row): row tensors and their image blocks; other values
    are dropped."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    n = batch["input_ids"].shape[0]
    for key, value in batch.items():
        if key in IMAGE_KEYS:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[idx.to(value.device)]
    if batch.get("pixel_values") is not None:
        blocks = image_blocks(batch)
        out["pixel_values"] = torch.cat([blocks[i] for i in idx.tolist()])  # (patches, D)
        out["image_grid_thw"] = batch["image_grid_thw"][idx.to(batch["image_grid_thw"].device)]
    return out


def append_completions(prompt_inputs: dict[str, Any], completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor) -> dict[str, Any]:
    """Prompt inputs (already repeated G times, left-padded) + completions → a model batch (N, P+C)."""
    batch = dict(prompt_inputs)
    batch["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)  # (N, P+C)
    batch["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_mask], dim=1)  # (N, P+C)
    zeros = torch.zeros_like(completion_mask, dtype=prompt_inputs["mm_token_type_ids"].dtype)  # (N, C)
    batch["mm_token_type_ids"] = torch.cat([prompt_inputs["mm_token_type_ids"], zeros], dim=1)  # (N, P+C)
    return batch


def pad_right(tensors: Sequence[torch.Tensor], value: int | float) -> torch.Tensor:
    """Concatenate (n_i, C_i) tensors along rows, right-padding each to the widest ``C`` with ``value``."""
    width = max(t.shape[1] for t in tensors)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]
    return torch.cat(padded, dim=0)  # (Σn_i, C)
