"""Images of records: cheap checks at setup (``check_image``) and full decoding (``load_image``).

A missing, undecodable, too small or too elongated image raises ``ImageError`` naming the path, with a
``kind`` for the bad-records report. 16-bit and float radiographs are min-max scaled to 8 bit; float images
with NaN or inf pixels are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# transformers' Qwen2-VL `smart_resize` (models/qwen2_vl/image_processing_qwen2_vl.py, used by Qwen3-VL's
# processor too) raises "absolute aspect ratio must be smaller than 200" when max(h, w) / min(h, w) > 200.
MAX_ASPECT_RATIO = 200.0
# `smart_resize` does not refuse small images: it upsamples them to `min_pixels` (56*56 by default). A side
# under 28 px (the Qwen2-VL resize factor: patch 14 x merge 2; Qwen3-VL uses 16 x 2) is still never a real
# radiograph, so we treat it as a broken file (thumbnail, placeholder). Our limit, not the processor's.
MIN_IMAGE_SIDE = 28


class ImageError(ValueError):
    """A missing, undecodable or unusable image; the message names the path. `kind` is the reason of the
    bad-records report: image_missing, image_undecodable, image_too_small, image_aspect_ratio."""

    def __init__(self, message: str, path: str | Path, kind: str = "image_bad") -> None:
        self.path, self.reason, self.kind = str(path), message, kind
        super().__init__(f"image {self.path!r}: {message}")


# ----------------------------------------------------------------------------------------------- images


def check_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE, max_aspect: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """Open the header and verify the file without a full decode; return (width, height) or raise ImageError."""
    path = _existing_file(path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # checks structure / PNG CRCs; does not catch every truncated JPEG (load_image does)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        raise ImageError(f"cannot be decoded ({type(e).__name__}: {e})", path, "image_undecodable") from e
    check_image_size(size, path, min_side, max_aspect)
    return size


def _existing_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a regular file, else ``ImageError`` (image_missing)."""
    path = Path(path)
    try:
        if path.is_file():
            return path
        reason = "file not found" if not path.exists() else "not a regular file"
    except (OSError, ValueError) as e:  # ENAMETOOLONG, ELOOP, embedded NUL ...
        reason = f"cannot be accessed ({type(e).__name__}: {e})"
    raise ImageError(reason, path, "image_missing")


def check_image_size(size: tuple[int, int], path: str | Path, min_side: int = MIN_IMAGE_SIDE,
                     max_aspect: float = MAX_ASPECT_RATIO) -> None:
    """Refuse sizes the Qwen image processor rejects (aspect ratio) or that cannot be a radiograph (tiny)."""
    w, h = size
    if min(w, h) < min_side:
        raise ImageError(f"size {w}x{h} is below the minimum side of {min_side} px", path, "image_too_small")
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageError(
            f"aspect ratio {max(w, h) / min(w, h):.1f} of size {w}x{h} exceeds {max_aspect:g} "
            "(the Qwen-VL image processor refuses it)", path, "image_aspect_ratio")


def load_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE, max_aspect: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode fully and return an RGB image. 16-bit / integer / float images are min-max scaled to 8 bit
    (PIL's own conversion clips them at 255, which would turn most 16-bit radiographs white)."""
    path = _existing_file(path)
    try:
        with Image.open(path) as im:
            im.load()
            check_image_size(im.size, path, min_side, max_aspect)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                a = np.asarray(im, dtype=np.float64)  # (H, W)
                if not np.isfinite(a).all():
                    raise ImageError(f"{int((~np.isfinite(a)).sum())} pixel(s) are NaN or infinite (mode {im.mode})",
                                     path, "image_nonfinite")
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                im = Image.fromarray(np.round(a).astype(np.uint8), mode="L")
            return im.convert("RGB")
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot be decoded ({type(e).__name__}: {e})", path, "image_undecodable") from e
