"""Crash-safe checkpoints (``lightning_modules/checkpoint_io.py``, ``main.py``) and the epoch counter after a resume.

- Saves are atomic: the bytes go to a temporary file beside the target (never ``TMPDIR``), unnamed (O_TMPFILE)
  or named; a failing or killed writer leaves the previous checkpoint intact and, after the next save or
  ``last`` resolution, no temporary file. A ``main.py fit`` killed while writing a checkpoint resumes with
  ``--ckpt_path last`` from the newest intact one.
- A damaged tensor payload is refused with an error naming the file (``torch.load`` itself does not notice);
  a file that is not a checkpoint gets a clear error; ``last`` skips damaged and truncated checkpoints, finds
  those of earlier logger versions, and without any checkpoint starts from scratch.
- The CLI gives every trainer the plugin (``FSDP2Strategy`` included) unless a ``CheckpointIO`` is configured.
- A ``max_epochs`` run resumed from the checkpoint of an epoch's last batch trains the same batches in the same
  epochs as an uninterrupted run (Lightning 2.6.6 alone skipped an epoch).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_modules.checkpoint_io as cio
import main as cli_main
from lightning_modules.checkpoint_io import AtomicCheckpointIO, CheckpointError
from tests.helpers import report_record, write_records

ROOT = Path(__file__).resolve().parents[1]
EVERY_STEP = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True}}])


def small_checkpoint(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((256,), value), "b": torch.arange(4)}, "global_step": int(value),
            "loops": {"fit_loop": {"epoch": 0}}, "pytorch-lightning_version": "2.6.6"}


def flip_payload_byte(path: Path, offset: int = 100) -> None:
    """Flip one byte inside the first tensor storage of a torch zip checkpoint (the zip structure stays valid)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data/0")))
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def skip_unless_supported(unnamed: bool, folder: Path) -> None:
    if unnamed and not cio.unnamed_temp_supported(folder):
        pytest.skip("this filesystem (or sandbox) cannot link an O_TMPFILE in: the named temporary file is used")


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if cio._TEMP_NAME.match(p.name))


# ------------------------------------------------------------------------------------------- atomic saves
@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named_temp"])
def test_save_writes_beside_the_target_and_replaces_it_whole(tmp_path, monkeypatch, unnamed):
    monkeypatch.setattr(cio, "USE_O_TMPFILE", unnamed)
    skip_unless_supported(unnamed, tmp_path)
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    folder, io = tmp_path / "ckpt", AtomicCheckpointIO()
    io.save_checkpoint(small_checkpoint(1.0), folder / "c.ckpt")
    seen = {}
    real_save = torch.save

    def spy(obj, f, *args, **kwargs):  # what a reader sees while the new checkpoint is being written
        real_save(obj, f, *args, **kwargs)
        seen["folder"] = sorted(p.name for p in folder.iterdir())
        seen["old"] = float(io.load_checkpoint(folder / "c.ckpt", weights_only=True)["state_dict"]["w"][0])

    monkeypatch.setattr(torch, "save", spy)
    io.save_checkpoint(small_checkpoint(2.0), folder / "c.ckpt")
    assert seen["old"] == 1.0  # the old checkpoint is intact until the new one replaces it
    extra = [n for n in seen["folder"] if n != "c.ckpt"]
    assert extra == [] if unnamed else (len(extra) == 1 and cio._TEMP_NAME.match(extra[0]))  # beside the target
    assert list(elsewhere.iterdir()) == []  # nothing in TMPDIR
    assert sorted(p.name for p in folder.iterdir()) == ["c.ckpt"]
    assert io.load_checkpoint(folder / "c.ckpt", weights_only=True)["state_dict"]["w"][0] == 2.0


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named_temp"])
def test_a_failing_save_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch, unnamed):
    monkeypatch.setattr(cio, "USE_O_TMPFILE", unnamed)
    skip_unless_supported(unnamed, tmp_path)
    io = AtomicCheckpointIO()
    io.save_checkpoint(small_checkpoint(1.0), tmp_path / "c.ckpt")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(small_checkpoint(2.0), tmp_path / "c.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]
    assert io.load_checkpoint(tmp_path / "c.ckpt", weights_only=True)["global_step"] == 1


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
import torch
import lightning_modules.checkpoint_io as cio
cio.USE_O_TMPFILE = sys.argv[2] == "1"
folder = Path(sys.argv[1])
io = cio.AtomicCheckpointIO()
io.save_checkpoint({"state_dict": {"w": torch.ones(300_000)}, "global_step": 1}, folder / "c.ckpt")
real_save = torch.save

class Stall:  # the file torch.save writes to; stalls for good after 256 KiB
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        self.n += self.f.write(b)
        if self.n > 262144:
            self.f.flush()
            Path(sys.argv[3]).write_text("writing")
            time.sleep(600)
        return len(b)
    def flush(self):
        self.f.flush()

torch.save = lambda obj, f, *a, **k: real_save(obj, Stall(f), *a, **k)
io.save_checkpoint({"state_dict": {"w": torch.zeros(300_000)}, "global_step": 2}, folder / "c.ckpt")
"""


def child_env(tmp_path: Path, **extra: str) -> dict:
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "TMPDIR": str(elsewhere), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the writer exited ({proc.returncode}) before stalling:\n{(out + err)[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never reached the stall")
        time.sleep(0.1)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named_temp"])
def test_a_writer_killed_mid_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, unnamed):
    folder, marker = tmp_path / "ckpt", tmp_path / "marker"
    folder.mkdir()
    skip_unless_supported(unnamed, folder)
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "1" if unnamed else "0", str(marker)],
                            cwd=ROOT, env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc)
    during = sorted(p.name for p in folder.iterdir())
    kill(proc)
    assert list((tmp_path / "tmpdir").iterdir()) == []  # the temporary file was beside the target
    assert set(during) == {"c.ckpt", *temp_files(folder)} and len(during) == (1 if unnamed else 2)
    path, skipped, n = cio.newest_intact_checkpoint([folder])  # also sweeps the dead writer's temporary file
    assert path == folder / "c.ckpt" and skipped == [] and n == 1
    assert sorted(p.name for p in folder.iterdir()) == ["c.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the old checkpoint, whole


# -------------------------------------------------------------------------------------- the CLI, for real
def cli_args(tiny_ckpt, root: Path, *extra: str) -> list[str]:
    data = write_records(root / "data", [report_record(i) for i in range(4)])
    return ["fit", "--model", "lightning_modules.sft.SFTModule", "--model.policy.name_or_path", str(tiny_ckpt),
            "--model.policy.dtype", "float32", "--data", "datamodules.datamodule.RadVLMDataModule",
            "--data.train_files", f"[{data}]", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", "--trainer.callbacks", EVERY_STEP, "--seed_everything", "0", *extra]


KILLED_RUN = """
import os, sys, time
from pathlib import Path
import torch
real_save = torch.save

class Stall:  # stalls for good after 64 KiB of the step-3 checkpoint
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        self.n += self.f.write(b)
        if self.n > 65536:
            self.f.flush()
            Path(os.environ["MARKER"]).write_text("writing")
            time.sleep(600)
        return len(b)
    def flush(self):
        self.f.flush()

def save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("global_step") == 3:
        return real_save(obj, Stall(f), *a, **k)
    return real_save(obj, f, *a, **k)

torch.save = save
import main
main.main(sys.argv[1:])
"""


def test_a_run_killed_while_checkpointing_resumes_from_the_newest_intact_checkpoint(tiny_ckpt, tmp_path, caplog):
    root, marker = tmp_path / "run", tmp_path / "marker"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    args = cli_args(tiny_ckpt, root, "--trainer.max_steps", "5")
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=child_env(tmp_path, MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc)
    folder = root / "checkpoints"
    kill(proc)
    assert list((tmp_path / "tmpdir").iterdir()) == []
    names = sorted(p.name for p in folder.iterdir() if not cio._TEMP_NAME.match(p.name))
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]  # no partial step-3 file
    for name in names:
        cio.verify_checkpoint(folder / name)
    with caplog.at_level(logging.INFO, logger="lightning_modules.checkpoint_io"):
        cli = cli_main.main(cli_args(tiny_ckpt, root, "--trainer.max_steps", "5", "--ckpt_path", "last"))
    assert "--ckpt_path last: resuming from" in caplog.text and "last.ckpt" in caplog.text
    assert cli.config.fit.ckpt_path == str(folder / "last.ckpt")
    assert cli.trainer.global_step == 5 and cli.model.batches_trained == 5  # 2 before the kill, 3 after
    assert temp_files(folder) == []
    for step in (3, 4, 5):
        cio.verify_checkpoint(next(folder.glob(f"*-step={step}.ckpt")))


@pytest.fixture(scope="module")
def finished_run(tiny_ckpt, tmp_path_factory) -> Path:
    """A CLI run of 3 steps with a checkpoint after each (and last.ckpt): its root folder."""
    root = tmp_path_factory.mktemp("finished")
    cli_main.main(cli_args(tiny_ckpt, root, "--trainer.max_steps", "3"))
    return root


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)  # copy2: modification times kept
    return to / "checkpoints"


def test_a_damaged_payload_is_refused_naming_the_file(finished_run, tiny_ckpt, tmp_path):
    folder = copy_run(finished_run, tmp_path / "run")
    damaged = folder / "epoch=0-step=2.ckpt"
    flip_payload_byte(damaged)
    torch.load(damaged, weights_only=True)  # torch does not notice
    with pytest.raises(CheckpointError, match=r"epoch=0-step=2\.ckpt'?: payload checksum mismatch"):
        AtomicCheckpointIO().load_checkpoint(damaged, weights_only=True)
    with pytest.raises(CheckpointError, match="payload checksum mismatch"):
        cio.verify_checkpoint(damaged)
    with pytest.raises(CheckpointError, match=r"epoch=0-step=2\.ckpt'?: payload checksum mismatch"):
        cli_main.main(cli_args(tiny_ckpt, tmp_path / "again", "--trainer.max_steps", "4", "--ckpt_path", str(damaged)))


def test_ckpt_path_last_skips_damaged_and_truncated_checkpoints(finished_run, tiny_ckpt, tmp_path, caplog):
    folder = copy_run(finished_run, tmp_path / "run")
    raw = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(raw[: len(raw) // 2])  # truncated (a copy cut short)
    flip_payload_byte(next(folder.glob("*-step=3.ckpt")))
    with caplog.at_level(logging.INFO, logger="lightning_modules.checkpoint_io"):
        cli = cli_main.main(cli_args(tiny_ckpt, tmp_path / "run", "--trainer.max_steps", "4", "--ckpt_path", "last"))
    assert cli.config.fit.ckpt_path == str(folder / "epoch=0-step=2.ckpt")
    assert "skipping" in caplog.text and "last.ckpt" in caplog.text and "truncated or damaged" in caplog.text
    assert "-step=3.ckpt: payload checksum mismatch" in caplog.text
    assert cli.trainer.global_step == 4 and cli.model.batches_trained == 4


def test_ckpt_path_last_finds_the_checkpoints_of_earlier_logger_versions(tmp_path, caplog):
    from lightning.pytorch.loggers import TensorBoardLogger

    io = AtomicCheckpointIO()
    for version, step in (("version_0", 5), ("version_1", 7)):
        io.save_checkpoint(small_checkpoint(step), tmp_path / "tb" / "sft" / version / "checkpoints" / "last.ckpt")
    os.utime(tmp_path / "tb" / "sft" / "version_0" / "checkpoints" / "last.ckpt", (1, 1))  # older
    trainer = L.Trainer(logger=TensorBoardLogger(save_dir=tmp_path / "tb", name="sft"), default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    assert trainer.logger.version == 2  # a new run logs into a new version: Lightning's "last" looks there only
    with caplog.at_level(logging.INFO, logger="lightning_modules.checkpoint_io"):
        assert cio.resolve_last(trainer) == tmp_path / "tb" / "sft" / "version_1" / "checkpoints" / "last.ckpt"


def test_ckpt_path_last_without_checkpoints_starts_from_scratch_and_with_only_damaged_ones_stops(tmp_path, caplog):
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="lightning_modules.checkpoint_io"):
        assert cio.resolve_last(trainer) is None
    assert "no checkpoint in" in caplog.text and "starts from scratch" in caplog.text
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints .* is intact"):
        cio.resolve_last(trainer)


@pytest.mark.parametrize("kind", ["json", "empty", "hf_weights", "folder", "pickle_object"])
def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, kind):
    path = tmp_path / "x.ckpt"
    expected = {"json": "is not a PyTorch checkpoint: torch.save writes zip archives, this file starts with b'{",
                "empty": "is not a PyTorch checkpoint", "hf_weights": "not a Lightning checkpoint: it holds only 2 tensors",
                "folder": "is a folder, not a checkpoint file", "pickle_object": "holds objects that torch.load"}[kind]
    if kind == "json":
        path.write_text(json.dumps({"state_dict": {}}))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "hf_weights":
        torch.save({"lm_head.weight": torch.ones(2, 2), "embed.weight": torch.ones(2, 2)}, path)
    elif kind == "folder":
        path.mkdir()
    else:
        torch.save({"state_dict": {}, "thing": Path("/x")}, path)  # an object weights_only refuses
    with pytest.raises(CheckpointError) as err:
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    assert str(err.value).startswith(f"checkpoint '{path}': ") and expected in str(err.value)
    if kind != "folder":
        with pytest.raises(CheckpointError, match=re.escape(expected[:30])):
            cio.verify_checkpoint(path)


def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path, caplog):
    torch.save(small_checkpoint(3.0), tmp_path / "old.ckpt")  # written without the plugin
    with caplog.at_level(logging.WARNING, logger="lightning_modules.checkpoint_io"):
        assert AtomicCheckpointIO().load_checkpoint(tmp_path / "old.ckpt", weights_only=True)["global_step"] == 3
    assert "has no payload checksum" in caplog.text


def record_fit(monkeypatch) -> None:
    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None,
            weights_only=None):
        pass

    monkeypatch.setattr(L.Trainer, "fit", fit)


@pytest.mark.parametrize("extra, expected", [
    ((), AtomicCheckpointIO),
    (("--trainer.strategy", '{"class_path": "lightning_modules.strategies.FSDP2Strategy"}', "--trainer.devices", "1"),
     AtomicCheckpointIO),
    (("--trainer.plugins", '[{"class_path": "lightning.fabric.plugins.TorchCheckpointIO"}]'), "TorchCheckpointIO"),
], ids=["default", "fsdp2", "user_plugin"])
def test_the_cli_gives_every_trainer_the_atomic_checkpoint_io(tiny_ckpt, tmp_path, monkeypatch, extra, expected):
    record_fit(monkeypatch)
    cli = cli_main.main(cli_args(tiny_ckpt, tmp_path, *extra))
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO) if expected is AtomicCheckpointIO else type(io).__name__ == expected


# ------------------------------------------------------------------------------------------ FSDP2, 2 CPUs
def test_fsdp2_checkpoints_full_and_distributed_save_verify_and_resume(tiny_ckpt, tmp_path):
    """FSDP2Strategy on two CPU processes with the plugin: a full-file checkpoint goes through it (checksummed,
    verified), a distributed one does not (a folder; verified by its metadata); both resume."""
    data = write_records(tmp_path / "data", [report_record(i) for i in range(8)])
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_WORKER)
    run = subprocess.run([sys.executable, str(script), str(tiny_ckpt), str(data), str(tmp_path / "out")], cwd=ROOT,
                         env=child_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    for mode in ("full", "distributed"):
        info = [json.loads((tmp_path / "out" / mode / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(i["resumed_step"] == 3 for i in info), info
        ckpt = tmp_path / "out" / mode / "ckpt" / "last.ckpt"
        assert ckpt.is_file() if mode == "full" else (ckpt.is_dir() and (ckpt / "meta.pt").is_file())
        cio.verify_checkpoint(ckpt)
        if mode == "full":
            assert cio.CHECKSUM_KEY in torch.load(ckpt, weights_only=True, mmap=True)
    assert list((tmp_path / "tmpdir").iterdir()) == []


FSDP2_WORKER = """
import json, sys
from pathlib import Path
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO, verify_checkpoint
from lightning_modules.sft import SFTModule
from lightning_modules.strategies import FSDP2Strategy
from radvlm.policy import PolicyConfig

ckpt, data_file, out = sys.argv[1:4]
torch.set_num_threads(1)

def fit(mode, max_steps, ckpt_path=None):
    folder = Path(out) / mode
    module = SFTModule(PolicyConfig(ckpt, dtype="float32"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                       num_generation_samples=0)
    data = RadVLMDataModule(ckpt, train_files=[data_file], batch_size=2)
    callbacks = [ModelCheckpoint(dirpath=folder / "ckpt", save_last=True, every_n_train_steps=1)] if ckpt_path is None else []
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=folder,
                        strategy=FSDP2Strategy(save_distributed_checkpoint=mode == "distributed"),
                        plugins=[AtomicCheckpointIO()], callbacks=callbacks, enable_checkpointing=bool(callbacks))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    return trainer

for mode in ("full", "distributed"):
    L.seed_everything(0)
    fit(mode, 2)
    last = Path(out) / mode / "ckpt" / "last.ckpt"
    verify_checkpoint(last)
    trainer = fit(mode, 3, ckpt_path=str(last))
    (Path(out) / mode / f"rank{trainer.global_rank}.json").write_text(json.dumps({"resumed_step": trainer.global_step}))
"""


# ------------------------------------------------------------------------------- epochs after an epoch end
class EpochRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, tuple[str, ...]]] = []
        self.epoch_ends: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, tuple(batch["ids"])))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append(trainer.current_epoch)


def test_max_epochs_run_resumed_from_an_epochs_last_batch_trains_every_epoch(tiny_ckpt, tmp_path):
    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.sft import SFTModule
    from radvlm.policy import PolicyConfig

    data_file = write_records(tmp_path / "data", [report_record(i) for i in range(6)])  # batches 4 + 2: 2 per epoch

    def fit(root: Path, ckpt_path: str | None = None, callbacks=()) -> tuple[EpochRecorder, L.Trainer]:
        L.seed_everything(0)
        module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), num_generation_samples=0)
        data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], batch_size=4)
        recorder = EpochRecorder()
        trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                            callbacks=[recorder, *callbacks], enable_checkpointing=bool(callbacks))
        trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
        return recorder, trainer

    straight, _ = fit(tmp_path / "a", callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)])
    assert [e for e, _ in straight.batches] == [0, 0, 1, 1, 2, 2]
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"  # written in on_train_batch_end of epoch 0's last batch
    assert torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]
    resumed, trainer = fit(tmp_path / "b", str(ckpt))
    assert resumed.batches == straight.batches[2:]  # epochs 1 and 2, same batches (Lightning alone: epoch 2 only)
    assert resumed.epoch_ends == [0, 1, 2] and trainer.current_epoch == 3 and trainer.global_step == 6
