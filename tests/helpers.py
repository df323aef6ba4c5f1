"""Small builders shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_records(folder: Path, records: list[dict], name: str = "data.json") -> Path:
    """Write RadVLM records (and a random 64×64 PNG for every ``image`` they name) under ``folder``."""
    rng = np.random.default_rng(0)
    for rec in records:
        if "image" in rec:
            path = folder / rec["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).save(path)
    out = folder / name
    out.write_text(json.dumps(records))
    return out


def report_record(i: int, answer: str = "The heart is normal. No pleural effusion.") -> dict:
    return {
        "id": f"r{i}",
        "image": f"img/{i}.png",
        "task": "report_generation",
        "conversations": [
            {"from": "human", "value": "<image>\nWrite a radiology report for this Chest X-ray."},
            {"from": "gpt", "value": answer},
        ],
    }
