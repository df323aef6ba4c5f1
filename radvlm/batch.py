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


def pack_rows(batch: dict[str, Any], position_ids: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """The real tokens of every row (``attention_mask`` 1) back to back in one sequence, without padding.

    ``position_ids`` (4, N, T): each row's text and M-RoPE positions (``generation.mrope_position_ids``); the text
    row restarts at 0 with every packed row, which is how the model's mask finds the rows (a causal mask within
    each row: Hugging Face's packed-sequence mask, or ``flash_attention_2``'s varlen kernels). Image tensors are
    kept as they are: the image tokens stay in row order, so every row's features land on its own tokens.

    Returns ``(packed, where)``: ``packed`` with ``input_ids`` / ``mm_token_type_ids`` (1, S), ``position_ids``
    (4, 1, S), no ``attention_mask``; ``where`` (N, T) the index in the packed sequence of each token, −1 on
    padding. Example: rows [p, a, b] and [c, d, e] with masks [0, 1, 1], [1, 1, 1] → [a, b, c, d, e] with
    text positions [0, 1, 0, 1, 2] and ``where`` [[−1, 0, 1], [2, 3, 4]].
    """
    keep = batch["attention_mask"].bool()  # (N, T)
    where = torch.cumsum(keep.flatten().long(), 0).view(keep.shape) - 1  # (N, T)
    where = where.masked_fill(~keep, -1)
    packed = {key: value for key, value in batch.items()
              if key in IMAGE_KEYS or key in DISTINCT_KEYS or key == "image_index"}
    packed["input_ids"] = batch["input_ids"][keep].unsqueeze(0)  # (1, S)
    if batch.get("mm_token_type_ids") is not None:
        packed["mm_token_type_ids"] = batch["mm_token_type_ids"][keep].unsqueeze(0)  # (1, S)
    packed["position_ids"] = position_ids[:, keep].unsqueeze(1)  # (4, 1, S)
    return packed, where


def trim_padding(batch: dict[str, Any], completion_mask: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor, int]:
    """The batch without the columns that are padding in every row: leading prompt columns whose
    ``attention_mask`` is 0 in all rows, and trailing completion columns that ``completion_mask`` masks in all
    rows (at least one completion column is kept). Exact for a causal model: positions come from the
    attention mask, and no kept token attends to a removed one.

    Returns ``(trimmed batch, trimmed completion mask (N, C'), right)``: pad the (N, C') results with
    ``right`` zero columns to get (N, C) back. Example: masks [[0, 0, 1 | 1, 0, 0], [0, 1, 1 | 1, 1, 0]]
    (prompt | completion) → one leading and one trailing column go: [[0, 1 | 1, 0], [1, 1 | 1, 1]], right 1."""
    att = batch["attention_mask"]  # (N, T)
    n, t = att.shape
    c = completion_mask.shape[1]
    used = att[:, : t - c].bool().any(0)  # (T - C,) prompt columns some row uses
    lead = int(used.long().argmax()) if bool(used.any()) else t - c
    filled = completion_mask.bool().any(0)  # (C,)
    last = int(filled.nonzero().max()) if bool(filled.any()) else 0
    right = c - 1 - last
    if lead == 0 and right == 0:
        return batch, completion_mask, 0
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (n, t):
            out[key] = value[:, lead : t - right]
    return out, completion_mask[:, : c - right], right
