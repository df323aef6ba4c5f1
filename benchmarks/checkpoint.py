"""A complete Qwen3-VL checkpoint folder with random weights of the real shape, for ``benchmarks.pipeline``'s
first stage (``python -m benchmarks.pipeline_stage checkpoint OUT --size 2b``); below both the pipeline and its
stage wrapper, so neither imports the other for it."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def write_checkpoint(out: Path, size: str, device: str, dtype: str = "bfloat16", seed: int = 0,
                     work: Path | None = None) -> dict[str, Any]:
    """A complete checkpoint folder of ``size`` with random weights (tiny: ``radvlm.tiny`` as it is)."""
    import torch

    out = Path(out)
    if size == "tiny":
        from radvlm.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(out, seed=seed)
        return {"size": size, "folder": str(out)}
    from transformers import Qwen3VLForConditionalGeneration

    from benchmarks.rollout import shaped_config, tiny_folder
    from radvlm.policy import resolve_dtype

    tiny = tiny_folder(Path(work or tempfile.mkdtemp(prefix="radvlm-pipeline-")))
    config = shaped_config(tiny, size)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the device itself: seconds on a GPU for 8B
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=resolve_dtype(dtype))
    params = sum(p.numel() for p in model.parameters())
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(str(out))
    for f in tiny.iterdir():  # tokenizer, image processor, chat template; not the tiny weights or config
        if f.is_file() and not f.name.startswith(("model", "config", "generation_config")):
            shutil.copy2(f, out / f.name)
    info = {"size": size, "folder": str(out), "params_b": round(params / 1e9, 3), "dtype": dtype, "device": device,
            "init_s": round(init_s, 1), "save_s": round(time.perf_counter() - t0, 1),
            "gb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 2)}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def checkpoint_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Qwen3-VL checkpoint folder.")
    parser.add_argument("out")
    parser.add_argument("--size", default="2b", choices=["tiny", "small", "2b", "8b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="where the tiny tokenizer folder is written")
    args = parser.parse_args(argv)
    info = write_checkpoint(Path(args.out), args.size, args.device, args.dtype, args.seed,
                            Path(args.work) if args.work else None)
    print("checkpoint " + json.dumps(info))
