"""Checkpoint files that survive crashes: atomic writes, a payload checksum, and ``--ckpt_path last`` that skips
damaged files. ``main.py`` gives ``AtomicCheckpointIO`` to every trainer it builds (unless a ``CheckpointIO`` is
configured) and resolves ``last`` with ``newest_intact_checkpoint`` before Lightning does.

Saving, loading and scope (single-file checkpoints only; distributed ones are only verified): ``AtomicCheckpointIO``;
the temporary files: ``atomic_save``; ``last``: ``resolve_last``. Unlike Lightning's own ``_atomic_save`` (an
in-memory copy, a temporary file in ``TMPDIR``, no fsync) and its ``last`` (the new run's folder only, unchecked).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
import secrets
import socket
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load

log = logging.getLogger(__name__)

CHECKSUM_KEY = "radvlm_checksum"
#: an unnamed O_TMPFILE for the bytes being written (Linux); tests switch it off to cover the named fallback
USE_O_TMPFILE = True
DISTRIBUTED_META = "meta.pt"  # Lightning's metadata file of a distributed checkpoint (fabric.utilities.load)
#: a shard newer than meta.pt by more than this (seconds) means an interrupted overwrite (slack for clock skew)
MTIME_SLACK_S = 5.0
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, not a Lightning checkpoint, damaged, incomplete."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        self.path, self.problem = str(path), message
        super().__init__(f"checkpoint {self.path!r}: {message}")


# ----------------------------------------------------------------------------------------------- checksum
def payload_checksum(checkpoint: dict[str, Any]) -> str:
    """sha256 (hex) of everything in ``checkpoint`` but its checksum entry: tensors by dtype, shape and bytes,
    other values by type and ``repr``, containers in their order (torch.save keeps dict order)."""
    digest = hashlib.sha256()
    stack: list[Any] = [{k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY}]
    while stack:  # iterative: no recursion limit for nested structures
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            _feed_tensor(digest, value)
        elif isinstance(value, dict):
            digest.update(b"D%d;" % len(value))
            for key, item in reversed(list(value.items())):
                stack += [item, key]  # popped: key, then item
        elif isinstance(value, (list, tuple)):
            digest.update(b"%s%d;" % (b"L" if isinstance(value, list) else b"T", len(value)))
            stack += list(reversed(value))
        elif isinstance(value, (set, frozenset)):
            digest.update(("S" + ",".join(sorted(repr(v) for v in value)) + ";").encode("utf-8", "surrogatepass"))
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _feed_tensor(digest, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    digest.update(f"T{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel() and t.device.type != "meta":
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def check_checkpoint(checkpoint: Any, path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` unless ``checkpoint`` is a Lightning checkpoint whose checksum (if it has one)
    matches its payload."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        if not isinstance(checkpoint, dict):
            what = f"a {type(checkpoint).__name__}"
        elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            what = (f"only {len(checkpoint)} tensors (a plain weights file such as a Hugging Face "
                    "pytorch_model.bin; give its folder as --model.init_args.policy.name_or_path instead)")
        else:
            what = f"a dict without 'state_dict' (keys: {sorted(map(str, checkpoint))[:8]})"
        raise CheckpointError(f"not a Lightning checkpoint: it holds {what}", path)
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        log.warning("checkpoint %r has no payload checksum (written without AtomicCheckpointIO): loaded unverified",
                    str(path))
        return
    if not (isinstance(stored, dict) and stored.get("algorithm") == "sha256" and isinstance(stored.get("digest"), str)):
        raise CheckpointError(f"malformed checksum entry {CHECKSUM_KEY!r}: {stored!r:.120}", path)
    actual = payload_checksum(checkpoint)
    if actual != stored["digest"]:
        raise CheckpointError(
            f"payload checksum mismatch (stored sha256 {stored['digest'][:16]}…, computed {actual[:16]}…): the file "
            "was damaged after it was written (disk, copy or transfer); resume from another checkpoint "
            "(--ckpt_path last takes the newest intact one)", path)


def describe_load_error(error: BaseException, path: str | os.PathLike | None = None) -> str:
    """What a ``torch.load`` failure of ``path`` means for a user, with torch's first line."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    if isinstance(error, IsADirectoryError) or (path is not None and Path(path).is_dir()):
        return ("is a folder, not a checkpoint file (a distributed checkpoint is loaded by the strategy that wrote "
                "it: FSDP2Strategy)")
    if path is not None and not _is_remote(path) and Path(path).is_file() and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(16)
        if not head.startswith(b"PK\x03\x04"):  # a zip cut short still starts like one
            return (f"is not a PyTorch checkpoint: torch.save writes zip archives, this file starts with {head!r} "
                    f"({type(error).__name__}: {first[:120]})")
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return ("holds objects that torch.load(weights_only=True) refuses (our checkpoints hold only tensors and plain "
                f"values; pass --weights_only false only for a file you trust): {first}")
    return (f"cannot be read by torch.load ({type(error).__name__}: {first}): a truncated or damaged checkpoint")


# ------------------------------------------------------------------------------------------------ saving
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's)
        return True
    return True


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the named temporary files of ``atomic_save`` in ``folder`` whose process (on this host) is gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_NAME.match(p.name)
        if m and m["host"] == _host() and not _alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) of interrupted checkpoint saves in %s", len(removed), folder)
    return removed


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(obj: Any, f) -> None:
    torch.save(obj, f)
    f.flush()
    os.fsync(f.fileno())


_UNNAMED_OK: dict[int, bool] = {}  # st_dev → whether an O_TMPFILE can be linked in there


def unnamed_temp_supported(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s filesystem takes an O_TMPFILE and links it in through /proc (probed once per device:
    some kernels, filesystems and sandboxes refuse one or the other)."""
    if not (USE_O_TMPFILE and hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")):
        return False
    dev = os.stat(folder).st_dev
    if dev not in _UNNAMED_OK:
        ok = False
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError:  # EOPNOTSUPP / EISDIR / EINVAL
            fd = None
        if fd is not None:
            probe = _temp_path(Path(folder) / "probe")
            try:
                os.link(f"/proc/self/fd/{fd}", probe, follow_symlinks=True)
                ok = True
            except OSError:  # EXDEV, EPERM …
                pass
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe)
        _UNNAMED_OK[dev] = ok
    return _UNNAMED_OK[dev]


def _save_unnamed(obj: Any, target: Path) -> bool:
    """Write through an unnamed O_TMPFILE in the target's folder and link it in; False where unsupported."""
    if not unnamed_temp_supported(target.parent):
        return False
    try:
        fd = os.open(target.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError:
        return False
    with os.fdopen(fd, "wb") as f:  # the inode lives as long as this descriptor unless it is linked
        _write(obj, f)
        source = f"/proc/self/fd/{f.fileno()}"
        try:
            os.link(source, target, follow_symlinks=True)  # no file there yet: it appears complete
            return True
        except FileExistsError:
            pass
        except OSError:
            return False
        temp = _temp_path(target)
        try:
            os.link(source, temp, follow_symlinks=True)
        except OSError:
            return False
    try:
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return True


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial ``path``.

    The bytes go to a temporary file in the target's own folder (never ``TMPDIR``: only a rename within one
    filesystem is atomic); it is flushed and fsynced, renamed over the target, and the folder is fsynced. A
    reader sees the old checkpoint or the new one, never a part of one. On Linux the temporary file is an
    unnamed ``O_TMPFILE`` inode that the kernel frees when the process dies, so a kill leaves nothing behind;
    where that is refused (probed once per filesystem: NFS, Lustre, some sandboxes refuse the O_TMPFILE or its
    link through /proc) it is ``.<name>.tmp-<host>-<pid>-<hex>``, removed on any error and, after a kill, by the
    next save or ``last`` resolution in that folder once its process is gone. (Lightning's own ``_atomic_save``
    serialises into memory first, a second copy of the checkpoint, and commits local files through fsspec with
    a temporary file in ``TMPDIR`` and no fsync.)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(target.parent)
    if not _save_unnamed(obj, target):
        temp = _temp_path(target)
        try:
            with open(temp, "xb") as f:
                _write(obj, f)
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
    _fsync_dir(target.parent)


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, checksummed saves and verified loads.

    ``main.py`` gives it to every trainer it builds (unless a ``CheckpointIO`` is configured:
    ``with_atomic_checkpoint_io``). Scope: every single-file checkpoint that goes through the strategy's
    ``CheckpointIO``: one device, DDP and ``FSDP2Strategy(save_distributed_checkpoint=False)`` (rank 0 writes
    the full state through it). Distributed checkpoints (``FSDP2Strategy``'s default in configs/: a folder of
    per-rank shards written by ``torch.distributed.checkpoint`` plus Lightning's ``meta.pt``) do not pass
    through a ``CheckpointIO``: they are neither atomic nor checksummed, and ``ModelParallelStrategy`` also
    loads full files itself. For those ``verify_checkpoint`` checks what can be checked cheaply, and ``main.py``
    verifies a ``--ckpt_path`` file up front when the strategy would load it without the plugin.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` with its checksum (``atomic_save``; remote paths: Lightning's fsspec transaction).

        A sha256 of the payload (every tensor's dtype, shape and bytes and every plain value, in the
        checkpoint's order: ``payload_checksum``) is stored in the checkpoint under ``"radvlm_checksum"``.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        payload = {**checkpoint, CHECKSUM_KEY: {"algorithm": "sha256", "digest": payload_checksum(checkpoint)}}
        if _is_remote(path):  # object stores: Lightning's fsspec transaction
            return super().save_checkpoint(payload, path)
        log.debug("saving checkpoint %s", path)
        atomic_save(payload, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load and check ``path`` (``check_checkpoint``).

        A file that ``torch.load`` cannot read, that is not a Lightning checkpoint (no ``state_dict``: a Hugging
        Face weights file, a JSON file …) or whose checksum does not match raises ``CheckpointError`` naming the
        file. Files without a checksum (older ones, or written without this plugin) load unverified, with a
        warning.
        """
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
            raise CheckpointError(describe_load_error(e, path), path) from e
        check_checkpoint(checkpoint, path)
        return checkpoint


def with_atomic_checkpoint_io(plugins: Any, strategy: Any = None) -> Any:
    """``plugins`` plus an ``AtomicCheckpointIO``, unless a ``CheckpointIO`` is among them or set on ``strategy``."""
    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed) or getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    return [*listed, AtomicCheckpointIO()]


def strategy_loads_with_checkpoint_io(strategy: Any) -> bool:
    """Whether ``strategy.load_checkpoint`` reads through its ``CheckpointIO`` (not FSDP / ModelParallel)."""
    from lightning.pytorch.strategies import Strategy

    return type(strategy).load_checkpoint is Strategy.load_checkpoint


# -------------------------------------------------------------------------------- verification and ``last``
def _read(path: Path, weights_only: bool | None) -> Any:
    try:
        if weights_only is False:  # a trusted file the user allowed to hold objects
            return pl_load(str(path), map_location="cpu", weights_only=False)
        # mmap: nothing is copied into memory (every rank of a node may verify the same file)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as e:
        raise CheckpointError("file not found", path) from e
    except Exception as e:
        raise CheckpointError(describe_load_error(e, path), path) from e


def verify_checkpoint(path: str | os.PathLike, weights_only: bool | None = True) -> None:
    """Raise ``CheckpointError`` unless ``path`` is an intact checkpoint file or distributed checkpoint folder.

    A file is checked as ``AtomicCheckpointIO.load_checkpoint`` checks it. A distributed checkpoint folder is
    complete when its ``.metadata`` and ``meta.pt`` exist, ``meta.pt`` loads and no shard is newer than
    ``meta.pt``, which Lightning writes last (a later save interrupted while overwriting the folder leaves newer
    shards).
    """
    path = Path(path)
    if not path.is_dir():
        check_checkpoint(_read(path, weights_only), path)
        return
    meta = path / DISTRIBUTED_META
    if not (path / ".metadata").is_file() or not meta.is_file():
        raise CheckpointError(f"a folder without .metadata and {DISTRIBUTED_META}: not a distributed checkpoint, or "
                              "one whose save did not finish", path)
    if not isinstance(_read(meta, weights_only), dict):
        raise CheckpointError(f"{DISTRIBUTED_META} is not a checkpoint dict", path)
    written = meta.stat().st_mtime
    newer = sorted(p.name for p in path.iterdir() if p.name != DISTRIBUTED_META and p.stat().st_mtime > written + MTIME_SLACK_S)
    if newer:
        raise CheckpointError(f"{newer[:3]} are newer than its {DISTRIBUTED_META} (written last): a later save into this "
                              "folder was interrupted and the shards mix two states", path)


def saved_radvlm_state(path: str | os.PathLike, weights_only: bool | None = True) -> dict[str, Any]:
    """The ``radvlm`` entry (``PolicyModule.on_save_checkpoint``) of a checkpoint file, or of the ``meta.pt`` of a
    distributed checkpoint folder; ``{}`` when it has none or cannot be read (loading it reports that)."""
    path = Path(path)
    try:
        data = _read(path / DISTRIBUTED_META if path.is_dir() else path, weights_only)
    except CheckpointError:
        return {}
    state = data.get("radvlm") if isinstance(data, dict) else None
    return state if isinstance(state, dict) else {}


def checkpoint_folders(trainer: Any) -> list[Path]:
    """Where the configuration puts checkpoints: each ``ModelCheckpoint.dirpath``; ``checkpoints/`` of every
    version folder of the first logger (Lightning's default ``<save_dir>/<name>/<version>/checkpoints``, also
    where ``last-good.ckpt`` goes), or of ``default_root_dir`` without a logger. Existing folders only."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = [Path(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath is not None]
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)
        folders += sorted(root.glob("*/checkpoints"))
    else:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    unique: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            unique.setdefault(os.path.abspath(folder), folder)
    return list(unique.values())


def _written(path: Path) -> float:
    meta = path / DISTRIBUTED_META
    try:
        return (meta if meta.is_file() else path).stat().st_mtime
    except OSError:  # a dangling symlink (save_last="link"): verification says why
        return float("-inf")


def newest_intact_checkpoint(folders: Iterable[str | os.PathLike], weights_only: bool | None = True
                             ) -> tuple[Path | None, list[tuple[Path, str]], int]:
    """The newest (modification time) checkpoint in ``folders`` that verifies, the newer ones that did not with
    the reason, and the number of candidates."""
    candidates: dict[str, Path] = {}
    for folder in folders:
        sweep_temp_files(folder)
        for p in Path(folder).glob("*.ckpt"):
            candidates.setdefault(os.path.abspath(p), p)
    order = sorted(candidates.values(), key=lambda p: (_written(p), p.name), reverse=True)
    skipped = []
    for p in order:
        try:
            verify_checkpoint(p, weights_only)
        except CheckpointError as e:
            skipped.append((p, e.problem))
            continue
        return p, skipped, len(order)
    return None, skipped, len(order)


def resolve_last(trainer: Any, weights_only: bool | None = True) -> Path | None:
    """``--ckpt_path last``: the newest intact checkpoint of the configuration's folders (logged, with what was
    skipped); ``None`` with a warning when there is none (the run starts from scratch, as Lightning does);
    ``CheckpointError`` when checkpoints exist but none is intact.

    ``main.py`` resolves ``last`` with it before Lightning does. Lightning takes the newest ``last*.ckpt`` in the
    ModelCheckpoint folder of the *new* run (with a logger: a fresh ``version_N`` that never holds the previous
    run's checkpoints, so it silently starts from scratch) and does not check it. Here
    ``newest_intact_checkpoint`` looks at every ``*.ckpt`` in the ``checkpoint_folders`` of the configuration
    (each ``ModelCheckpoint.dirpath``, and ``checkpoints/`` of every version of the logger, or of
    ``default_root_dir`` without a logger), newest modification time first, and returns the first that
    verifies, with the skipped ones and why.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    folders = checkpoint_folders(trainer)
    path, skipped, n = newest_intact_checkpoint(folders, weights_only)  # every process decides the same
    where = ", ".join(str(f) for f in folders) or "(no checkpoint folder exists yet)"
    if path is None and n:
        reasons = "; ".join(f"{p}: {reason}" for p, reason in skipped)
        raise CheckpointError(f"none of the {n} checkpoints in {where} is intact ({reasons})", where)
    if getattr(rank_zero_only, "rank", 0) != 0:  # one account in the log, from the first process
        return path
    for p, reason in skipped:
        log.warning("--ckpt_path last: skipping %s: %s", p, reason)
    if path is None:
        log.warning("--ckpt_path last: no checkpoint in %s; training starts from scratch", where)
        return None
    note = f" ({len(skipped)} newer one(s) skipped)" if skipped else ""
    (log.warning if skipped else log.info)("--ckpt_path last: resuming from %s, the newest intact of %d checkpoint(s) "
                                           "in %s%s", path, n, where, note)
    return path
