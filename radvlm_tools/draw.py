"""Pictures of grounding outputs: ground-truth boxes in green, predicted boxes in red, each labelled with the
finding its text names, the phrase underneath.

Boxes are ``[x1, y1, x2, y2]`` normalised to [0, 1] by image width and height (docs/paper.md §4). For drawing
only, each box is clipped to the image and its corners are ordered (an inverted box is drawn as the
rectangle it spans); the metrics never see these adjusted boxes. Small images (the 128-pixel phantoms) are
scaled up first so that lines and text stay legible.

- ``box_labels(text)``: the finding each box of a text is named with ("The mass is located at the coordinates
  [..]" → "mass"), aligned with ``metrics.boxes.parse_boxes(text)``;
- ``draw_boxes(image, gt_boxes, pred_boxes, caption, gt_labels=, pred_labels=)``: one annotated picture (pure:
  no file access); a label is written in the box's colour beside its box (ground truth above, predictions below);
- ``sample_picture(image_path, answer, gt_boxes, caption, reference=)``: the same from an image file and a model
  answer (predicted boxes parsed from the answer by ``metrics.boxes.parse_boxes``, as the metrics parse them;
  labels from the answer and from the reference text);
- ``image_grid(pictures, columns)``: several pictures on one canvas (the TensorBoard image grid);
- ``write_pictures(rows, out_dir)``: PNG files of prediction rows (``python -m radvlm_tools.evaluate --draw``).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from metrics.boxes import box_spans, parse_boxes
from metrics.grounding import soft_f1

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
LEGEND_GT_COLOUR = (0, 160, 0)  # darker green: pure green text is hard to read on white
TEXT_COLOUR = (0, 0, 0)
BAND_COLOUR = (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


# words of the answer templates around a box ("The X is located at the coordinates [..] on the image", "X at
# [..] and [..]", "This phrase can be observed at [..]"): what is left names the finding
_TEMPLATE_WORDS = re.compile(
    r"\b(the|a|an|is|are|was|located|locate|at|coordinates?|on|image|this|phrase|can|be|observed|seen|found|"
    r"and|of|in|with|there|box|region)\b", re.IGNORECASE)
MAX_LABEL_CHARS = 24


def box_labels(text: str) -> list[str]:
    """One label per box of ``text`` (the boxes ``parse_boxes`` returns, in order): the words between the box and
    the previous box or sentence end, without the template words. A box whose own words are empty (the second
    box of "at [..] and [..]") takes the previous box's label; "" when nothing names it."""
    labels: list[str] = []
    prev_end = 0
    for start, end, finite in box_spans(text):
        words = re.split(r"[.;:!?\n]", text[prev_end:start])[-1]
        words = " ".join(_TEMPLATE_WORDS.sub(" ", words).replace(",", " ").split()).strip()
        if not words and labels and not re.search(r"[.;:!?\n]", text[prev_end:start]):
            words = labels[-1]
        prev_end = end
        if finite:  # parse_boxes skips non-finite groups
            labels.append(words[:MAX_LABEL_CHARS])
    return labels


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """A normalised box as pixel corners (left, top, right, bottom) inside the image; None if not drawable."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates [x1, y1, x2, y2], got {len(box)}: {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    left, right = sorted((_to_pixel(x1, width), _to_pixel(x2, width)))
    top, bottom = sorted((_to_pixel(y1, height), _to_pixel(y2, height)))
    return left, top, right, bottom


def _to_pixel(v: float, n: int) -> int:
    """A normalised coordinate clipped to [0, 1], as a pixel index in 0 .. n - 1."""
    return min(round(min(max(v, 0.0), 1.0) * n), n - 1)


def draw_boxes(
    image: Image.Image,
    gt_boxes: Sequence[Sequence[float]],
    pred_boxes: Sequence[Sequence[float]],
    caption: str | None = None,
    size: int | None = 512,
    line_width: int | None = None,
    gt_labels: Sequence[str] | None = None,
    pred_labels: Sequence[str] | None = None,
) -> Image.Image:
    """A new RGB picture: ``image`` (longer side scaled to ``size``; ``None`` keeps it), ground-truth boxes
    green, predicted boxes red (drawn on top), each with its label (``gt_labels`` / ``pred_labels``, one per box,
    optional) beside it (ground truth above, predictions below the box), and a white band below with a legend and ``caption``."""
    picture = image.convert("RGB")
    if size is not None:
        scale = size / max(picture.size)
        new = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(new, Image.Resampling.BILINEAR)
    else:
        picture = picture.copy()
    w, h = picture.size
    lw = line_width or max(1, round(min(w, h) / 160))
    draw = ImageDraw.Draw(picture)
    for boxes, colour in ((gt_boxes, GT_COLOUR), (pred_boxes, PRED_COLOUR)):
        for box in boxes:
            corners = pixel_box(box, w, h)
            if corners is not None:
                draw.rectangle(corners, outline=colour, width=lw)
    font = _font(max(8, round(min(w, h) / 24)))
    for boxes, labels, colour in ((gt_boxes, gt_labels, GT_COLOUR), (pred_boxes, pred_labels, PRED_COLOUR)):
        for box, label in zip(boxes, labels or []):
            corners = pixel_box(box, w, h)
            if corners is not None and label:
                _label(draw, corners, label, colour, font, lw, (w, h), below=colour == PRED_COLOUR)
    if caption is None:
        return picture
    return _with_band(picture, caption)


def _label(draw: ImageDraw.ImageDraw, corners: tuple[int, int, int, int], text: str, colour, font, lw: int,
           size: tuple[int, int], below: bool) -> None:
    """``text`` in ``colour`` on a dark plate at the box's left edge: just above the box (ground truth) or just
    below it (``below``: predictions, so that the labels of coinciding boxes do not overlap); inside the box
    when there is no room outside."""
    left, top, right, bottom = corners
    width, height = size
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    tw, th = x1 - x0, y1 - y0
    if below:
        y = bottom + lw + 1 if bottom + lw + th + 2 < height else bottom - th - lw - 2
    else:
        y = top - th - 2 * lw - 1 if top - th - 2 * lw - 1 >= 0 else top + lw + 1
    x = min(left, max(width - tw - 2, 0))
    draw.rectangle((x, y, x + tw + 1, y + th + 1), fill=(0, 0, 0))
    draw.text((x + 1 - x0, y + 1 - y0), text, fill=colour, font=font)


def _with_band(picture: Image.Image, caption: str) -> Image.Image:
    """``picture`` above a white band: legend line (coloured words) and the wrapped caption."""
    w, h = picture.size
    font_size = max(10, round(w / 36))
    font = _font(font_size)
    chars_per_line = max(10, int(w / (0.55 * font_size)))
    lines = textwrap.wrap(" ".join(caption.split()), chars_per_line)[:6]
    line_h = round(font_size * 1.3)
    band = line_h * (len(lines) + 1) + font_size // 2
    out = Image.new("RGB", (w, h + band), BAND_COLOUR)
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    x, y = font_size // 3, h + font_size // 4
    for word, colour in (("ground truth", LEGEND_GT_COLOUR), ("  prediction", PRED_COLOUR)):
        draw.text((x, y), word, fill=colour, font=font)
        x += draw.textlength(word, font=font)
    for i, line in enumerate(lines, start=1):
        draw.text((font_size // 3, y + i * line_h), line, fill=TEXT_COLOUR, font=font)
    return out


def sample_picture(
    image_path: str | Path,
    answer: str,
    gt_boxes: Sequence[Sequence[float]],
    caption: str | None = None,
    size: int | None = 512,
    reference: str | None = None,
    labels: bool = True,
) -> Image.Image:
    """``draw_boxes`` of an image file, with the predicted boxes parsed from the model's ``answer``; with
    ``labels`` each predicted box carries the finding the answer names for it, and each ground-truth box the
    one ``reference`` names (when its boxes are ``gt_boxes``, i.e. as many)."""
    path = Path(image_path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    pred_labels = box_labels(answer) if labels else None
    gt_labels = None
    if labels and reference:
        ref_labels = box_labels(reference)
        gt_labels = ref_labels if len(ref_labels) == len(gt_boxes) else None
    with Image.open(path) as img:
        img.load()
        return draw_boxes(img, gt_boxes, parse_boxes(answer), caption, size=size, gt_labels=gt_labels,
                          pred_labels=pred_labels)


def image_grid(pictures: Sequence[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    """Pictures in rows of ``columns`` cells (cell = the largest picture), white padding; RGB."""
    if not pictures:
        raise ValueError("image_grid needs at least one picture")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cols = min(columns, len(pictures))
    rows = -(-len(pictures) // cols)
    cw = max(p.width for p in pictures)
    ch = max(p.height for p in pictures)
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * ch + (rows + 1) * pad), BAND_COLOUR)
    for i, p in enumerate(pictures):
        r, c = divmod(i, cols)
        grid.paste(p.convert("RGB"), (pad + c * (cw + pad), pad + r * (ch + pad)))
    return grid


def write_pictures(rows: Sequence[dict], out_dir: str | Path, size: int | None = 512) -> list[Path]:
    """One PNG per prediction row (``image``, ``answer``, ``reference``, optional ``gt_boxes``, ``prompt``)
    named after its id; the caption holds the prompt, the answer and its soft-F1. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        gt = row.get("gt_boxes") or parse_boxes(row["reference"])
        score = soft_f1(parse_boxes(row["answer"]), parse_boxes(row["reference"]))
        caption = f"{row.get('prompt', '')} | answer: {row['answer'][:200]} | soft-F1 {score:.2f}"
        target = out_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", str(row["id"])) + ".png")
        sample_picture(row["image"], row["answer"], gt, caption, size, reference=row["reference"]).save(target)
        written.append(target)
    return written
