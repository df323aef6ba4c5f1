"""Decoding on FSDP2-sharded weights: the same greedy ids as unsharded, and no collective per decoded token.

This file run as a script under ``torch.distributed.run`` (2 CPU processes, gloo) loads the tiny checkpoint,
decodes a prompt batch greedily unsharded, shards the policy with the project's ``shard_policy`` (the
``MixedPrecisionPolicy`` of float32 compute, as the tiny runs use) and decodes again through
``Policy.generate`` (plain and shared prefill) and through ``FastHFEngine`` with a memory budget that splits the
batch into chunks, counting every collective call (``torch.distributed``'s all-gather, reduce-scatter,
all-reduce, broadcast, barrier) at two completion budgets. The counts must not grow with the number of tokens
(one all-gather per unit on entry, as ``radvlm.sharding.whole_weights`` promises); the ids must match. The
two processes get different prompts, so one stops while the other still decodes, which deadlocks when a
decode step needs the other process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_reduce", "broadcast", "barrier", "all_gather")


def free_port() -> int:
    """A TCP port free on this machine now (for the rendezvous of ``torch.distributed.run``)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The environment of a test's worker processes: the repository importable, offline, one thread."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_with_hard_timeout(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, all of it killed at ``timeout`` (the test then fails: a hang)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{cmd[-3:]} did not finish in {timeout} s (a hang):\n{out[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_distributed(script: Path, args: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """``script args`` on ``nproc`` CPU processes (``torch.distributed.run``), killed as a group at ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), *args]
    return run_with_hard_timeout(cmd, timeout)


@pytest.fixture(scope="module")
def sharded_generation(tiny_ckpt, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("shardedgen")
    run = run_distributed(Path(__file__), [str(tiny_ckpt), str(out)], nproc=2, timeout=240)
    assert run.returncode == 0, run.stdout[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_sharded_greedy_decoding_gives_the_unsharded_ids(sharded_generation):
    for info in sharded_generation:
        assert info["sharded"]
        for mode in ("plain", "shared", "fast_chunked"):
            assert info[mode]["ids"] == info["unsharded"][mode], mode
    # the two processes decoded different prompts, to different lengths
    assert sharded_generation[0]["unsharded"]["plain"] != sharded_generation[1]["unsharded"]["plain"]


def test_sharded_decoding_makes_no_collective_per_token(sharded_generation):
    for info in sharded_generation:
        units = info["units"]
        for mode in ("plain", "shared", "fast_chunked"):
            counts = info[mode]["collectives"]  # {budget: {name: calls}}
            short, long = counts["3"], counts["12"]
            assert short == long, (mode, counts)  # 4x the tokens, the same calls
            assert short.get("all_gather_single", 0) == units  # one gather per FSDP unit, on entry
            assert sum(short.values()) == units, short


# ---------------------------------------------------------------------------------------------- the worker
def _prompts(ckpt: str, rank: int, folder: Path):
    from PIL import Image

    from datamodules.collate import PromptCollator
    from datamodules.records import Record, Turn
    from radvlm.processor import load_processor

    processor = load_processor(ckpt)
    collator = PromptCollator(processor)
    records = []
    for i in range(2):
        shade = 40 + 90 * i + 50 * rank
        image = folder / f"img{rank}_{i}.png"
        Image.new("RGB", (64, 64), (shade, shade, shade)).save(image)
        question = ["Where is the heart?", "Write a radiology report for this Chest X-ray."][(i + rank) % 2]
        records.append(Record(id=f"r{rank}_{i}", image=image, conversations=[Turn("user", question),
                                                                             Turn("assistant", "x")]))
    return collator(records)


def _counting():
    import torch.distributed as dist

    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted

    def start():
        counts.clear()
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))

    def stop() -> dict[str, int]:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        return dict(counts)

    return start, stop


def _worker(ckpt: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_modules.strategies import shard_policy
    from radvlm.fast_engine import FastHFEngine, kv_bytes_per_row
    from radvlm.policy import PolicyConfig
    from radvlm.rollout import Sampling
    from radvlm.sharding import fsdp2_units

    faulthandler.dump_traceback_later(float(os.environ.get("RADVLM_TEST_HANG_S", "200")), exit=True)  # a hang
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = PolicyConfig(ckpt, dtype="float32").build()
    batch = _prompts(ckpt, rank, Path(out))
    width = batch["input_ids"].shape[1]
    # a budget of one prompt's G rows: the fast engine decodes the two prompts in two chunks
    budget_gib = kv_bytes_per_row(policy.hf_model, width + 12) * 2 * 1.5 / 2**30
    fast = FastHFEngine(decode_memory_gib=budget_gib)
    greedy = Sampling(num_generations=2, max_new_tokens=12, do_sample=False)

    def decode(mode: str, budget: int) -> list[list[int]]:
        if mode == "fast_chunked":
            sampling = Sampling(num_generations=2, max_new_tokens=budget, do_sample=False)
            return fast.generate(policy, batch, sampling).completion_ids.tolist()
        out = policy.generate(batch, num_return_sequences=2, max_new_tokens=budget, shared_prefill=mode == "shared")
        return out.completion_ids.tolist()

    modes = ("plain", "shared", "fast_chunked")
    info = {"unsharded": {m: decode(m, greedy.max_new_tokens) for m in modes}}
    shard_policy(policy, init_device_mesh("cpu", (dist.get_world_size(),)))
    info["sharded"] = bool(fsdp2_units(policy))
    info["units"] = len(fsdp2_units(policy))
    start, stop = _counting()
    for mode in modes:
        counts = {}
        for budget in (3, 12):
            for unit in fsdp2_units(policy):  # every call starts sharded (FSDP2 may keep the root gathered)
                unit.reshard()
            start()
            ids = decode(mode, budget)
            counts[str(budget)] = stop()
        info[mode] = {"ids": ids, "collectives": counts}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
