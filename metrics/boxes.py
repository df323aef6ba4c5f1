"""Bounding boxes in RadVLM answers: parse them from text, write them back, and compare them by IoU.

Boxes are ``[x1, y1, x2, y2]`` normalised to [0, 1] by image width and height (docs/paper.md §4, §8).

Deviations from RadVLM: a group its evaluation parser would crash on is skipped, and digits are ASCII only
(``parse_boxes``); IoU clamps huge coordinates and gives 0 to a non-finite box (``pairwise_iou``). Both keep
the functions total: no string makes them raise, no box makes IoU NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

Box = tuple[float, float, float, float]
#: ``"reward"``: the soft-F1 reward's parser; ``"radvlm_eval"``: RadVLM's evaluation regex (``parse_boxes``)
BoxStyle = Literal["reward", "radvlm_eval"]
BOX_STYLES: tuple[str, ...] = ("reward", "radvlm_eval")

# One number: optional sign, digits with optional fraction (or a bare fraction), optional exponent. The
# alternatives cannot match the same text in two ways, which keeps the regex linear on long digit runs.
_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
BOX_PATTERN = re.compile(
    r"\[\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*\]"
)
#: RadVLM's evaluation regex (``extract_bounding_boxes``): no sign, no exponent; ``[0-9]`` for its ``\d``
RADVLM_EVAL_PATTERN = re.compile(r"\[([0-9.]+),\s*([0-9.]+),\s*([0-9.]+),\s*([0-9.]+)\]")
#: coordinates are clamped to this magnitude before IoU so that areas cannot overflow float64
_COORD_LIMIT = 1e150


def check_box_style(style: str) -> str:
    """``style`` if it is one of ``BOX_STYLES``, else a ``ValueError`` naming them."""
    if style not in BOX_STYLES:
        raise ValueError(f"unknown box style {style!r}; expected one of {BOX_STYLES}")
    return style


def parse_boxes(text: str, style: BoxStyle = "reward") -> list[Box]:
    """All ``[a, b, c, d]`` groups of ``text`` as float tuples, in order.

    ``style="reward"`` (default, the soft-F1 reward): sign and exponent allowed, non-finite groups skipped.
    ``style="radvlm_eval"``: RadVLM's evaluation regex (no sign, no exponent); a group ``float`` cannot read
    (``1.2.3``) is skipped where RadVLM would crash. Never raises on a string.

    ``"reward"`` finds every bracket group of exactly four numbers (sign, decimals and exponent allowed) and
    returns them in text order: the grounding reward's parser (docs/paper.md §4). A group holding a number that
    is not finite once read (``1e999``) is skipped; anything that is not a plain decimal number (``nan``,
    ``inf``, ``0x1``, ``1_0``) does not form a group at all. Coordinates are returned as written: no clipping,
    no reordering (IoU handles inverted boxes). It never raises on a string, whatever its content or length.

    ``"radvlm_eval"`` is RadVLM's evaluation parser (docs/paper.md §5, §8b: its ``extract_bounding_boxes``:
    ``RADVLM_EVAL_PATTERN``, its regex character for character but ASCII digits, each number read with
    ``float``): numbers of digits and dots only, so no sign and no exponent (``[-0.01, 0.2, 0.3, 0.4]`` is no
    box, nor is ``[1e-3, ...]``), no space after ``[`` or before ``,`` and ``]``. Deviation, to stay total:
    RadVLM's ``float`` raises on a matched number such as ``1.2.3`` or ``.`` and ends the evaluation; here that
    group is skipped. A group whose number overflows (300+ digits) is kept, as RadVLM keeps it:
    ``pairwise_iou`` gives it IoU 0 with every box, so it counts as a false positive (RadVLM's own arithmetic
    gives 0 too, or NaN when two infinities are subtracted).

    Digits are ASCII only in both styles (``[0-9]``): Python's ``\\d`` and ``float`` also read other Unicode
    decimal digits (Arabic-Indic ``٣``, full-width ``１``), so a model could write boxes no human reads as
    numbers. Deviation from RadVLM's regex (``\\d``), which would read them.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_boxes expects a str, got {type(text).__name__}")
    if check_box_style(style) == "radvlm_eval":
        return _parse_radvlm_eval(text)
    boxes: list[Box] = []
    for match in BOX_PATTERN.finditer(text):
        values = tuple(float(g) for g in match.groups())  # the regex only admits float() syntax
        if all(math.isfinite(v) for v in values):
            boxes.append(values)  # type: ignore[arg-type]
    return boxes


def _parse_radvlm_eval(text: str) -> list[Box]:
    boxes: list[Box] = []
    for match in RADVLM_EVAL_PATTERN.finditer(text):  # the matches of RadVLM's re.findall, in order
        try:
            values = tuple(float(g) for g in match.groups())
        except ValueError:  # "1.2.3", ".", "1..": RadVLM raises here; the group is not a box
            continue
        boxes.append(values)  # type: ignore[arg-type]  # an overflow (inf) stays: IoU 0, a false positive
    return boxes


def box_spans(text: str) -> list[tuple[int, int, bool]]:
    """``(start, end, finite)`` of each four-number bracket group of ``text``; finite ones are parsed."""
    spans = []
    for match in BOX_PATTERN.finditer(text):
        finite = all(math.isfinite(float(g)) for g in match.groups())
        spans.append((match.start(), match.end(), finite))
    return spans


def _format_number(value: float, ndigits: int) -> str:
    rounded = round(float(value), ndigits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return repr(rounded)


def format_box(box: Sequence[float], ndigits: int = 2) -> str:
    """One box as ``[0.12, 0.3, 0.5, 0.71]``, the way the RadVLM answers write it.

    Each coordinate is ``round(x, ndigits)`` printed by Python's ``repr`` of that float, so trailing zeros are
    dropped (``0.3``, not ``0.30``) and an integral value keeps one decimal (``1.0``, ``0.0``), exactly as
    ``str([round(x, 2) ...])`` prints; ``-0.0`` is written ``0.0``.
    """
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates [x1, y1, x2, y2], got {len(box)}: {box!r}")
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"cannot write a box with a non-finite coordinate: {box!r}")
    return "[" + ", ".join(_format_number(v, ndigits) for v in values) + "]"


def format_boxes(boxes: Sequence[Sequence[float]], ndigits: int = 2) -> str:
    """Boxes in RadVLM answer style: ``[a]``, ``[a] and [b]``, ``[a], [b] and [c]``; ``""`` for no box."""
    parts = [format_box(box, ndigits) for box in boxes]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def as_box_array(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:  # (K, 4) float64
    """Boxes as a float64 array of shape (K, 4); an empty sequence gives shape (0, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (K, 4), got {arr.shape}")
    return arr


def pairwise_iou(pred: Sequence[Sequence[float]] | np.ndarray,
                 gt: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:  # (P, G) float64
    """IoU of every predicted box with every ground-truth box; finite, in [0, 1], never NaN.

    The vectorised IoU of docs/paper.md §4 (areas clamped at 0, IoU 0 when the union is <= 0) in float64.
    Deviation needed to keep it total: coordinates are clamped to +-1e150 so that no product overflows (a
    normalised box never comes near), and a box with a NaN or infinite coordinate has IoU 0 with every box.
    RadVLM's evaluation IoU does not clamp areas; it agrees with this one on every pair it does not divide by
    zero on (a box inverted on an axis has no intersection, so its IoU is 0 either way).
    """
    p = _sanitise(as_box_array(pred))  # (P, 4), finite and clamped; bad rows NaN-free
    g = _sanitise(as_box_array(gt))  # (G, 4)
    lt = np.maximum(p[:, None, :2], g[None, :, :2])  # (P, G, 2) top-left of the intersection
    rb = np.minimum(p[:, None, 2:], g[None, :, 2:])  # (P, G, 2) bottom-right
    wh = np.maximum(rb - lt, 0.0)  # (P, G, 2)
    inter = wh[..., 0] * wh[..., 1]  # (P, G)
    wh_p = np.maximum(p[:, 2:] - p[:, :2], 0.0)  # (P, 2)
    wh_g = np.maximum(g[:, 2:] - g[:, :2], 0.0)  # (G, 2)
    union = (wh_p[:, 0] * wh_p[:, 1])[:, None] + (wh_g[:, 0] * wh_g[:, 1])[None, :] - inter  # (P, G)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # (P, G)
    return np.clip(iou, 0.0, 1.0, out=iou)


def _sanitise(boxes: np.ndarray) -> np.ndarray:  # (K, 4)
    """Clamp coordinates to +-_COORD_LIMIT; a row with a NaN or infinite value becomes an empty box at 0."""
    if np.all(np.abs(boxes) <= _COORD_LIMIT):  # fast path; False for NaN and inf
        return boxes
    bad = ~np.isfinite(boxes).all(axis=1)  # (K,)
    boxes = np.clip(boxes, -_COORD_LIMIT, _COORD_LIMIT)
    boxes[bad] = 0.0  # [0, 0, 0, 0] has area 0 and intersects nothing: IoU 0 with every box
    return boxes
