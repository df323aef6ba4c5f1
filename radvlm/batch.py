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
#: a batch whose rows share images (rollouts): each distinct image once, and each row's image
DISTINCT_KEYS = ("distinct_pixel_values", "distinct_image_grid_thw")


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
    are dropped. A batch whose rows share images (a rollout: ``distinct_pixel_values``, ``image_index``;
    ``Rollout.model_batch``) keeps only the distinct images the selected rows use, renumbered."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    n = batch["input_ids"].shape[0]
    for key, value in batch.items():
        if key in IMAGE_KEYS or key in DISTINCT_KEYS:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[idx.to(value.device)]
    if batch.get("pixel_values") is not None:
        blocks = image_blocks(batch)
        out["pixel_values"] = torch.cat([blocks[i] for i in idx.tolist()])  # (patches, D)
    if batch.get("image_grid_thw") is not None:
        out["image_grid_thw"] = batch["image_grid_thw"][idx.to(batch["image_grid_thw"].device)]
    if batch.get("distinct_pixel_values") is not None:
        used = sorted(set(out["image_index"].tolist()))  # the distinct images these rows show
        blocks = distinct_blocks(batch)
        grid = batch["distinct_image_grid_thw"]
        out["distinct_pixel_values"] = torch.cat([blocks[j] for j in used])  # (patches, D)
        out["distinct_image_grid_thw"] = grid[torch.as_tensor(used, device=grid.device)]  # (images, 3)
        renumber = {j: k for k, j in enumerate(used)}
        out["image_index"] = torch.tensor([renumber[j] for j in out["image_index"].tolist()],
                                          device=out["image_index"].device)  # (n,)
    return out


def distinct_blocks(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The patches of each distinct image of a batch with shared images (``distinct_pixel_values``)."""
    return torch.split(batch["distinct_pixel_values"], batch["distinct_image_grid_thw"].prod(-1).tolist())


def share_images(batch: dict[str, Any], g: int) -> dict[str, Any]:
    """A prompt batch's model inputs for its ``g``-fold repeated rows, the images kept once: rows repeated
    (``repeat_batch`` without ``pixel_values``), ``distinct_pixel_values`` / ``distinct_image_grid_thw`` the
    prompts' own images and ``image_index`` (N·g,) the image of each row (prompt ``i`` → rows ``i·g … i·g+g−1``
    show image ``i``). ``Policy`` computes each distinct image's vision features once and gives them to its
    rows: the same values and summed gradients as running the tower on every repeated copy."""
    base = {k: v for k, v in batch.items() if k != "pixel_values"}
    out = repeat_batch(base, g)
    if batch.get("pixel_values") is not None:
        out["distinct_pixel_values"] = batch["pixel_values"]  # (patches, D)
        out["distinct_image_grid_thw"] = batch["image_grid_thw"]  # (B, 3)
        out["image_index"] = torch.arange(batch["input_ids"].shape[0],
                                          device=batch["input_ids"].device).repeat_interleave(g)  # (B*g,)
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
