"""Resume checkpoints: written atomically (temp file, fsync, rename), so a kill at any instant leaves
the last good checkpoint loadable; and a per-run lock so two runs never write one folder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import torch


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the previous one is intact."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` atomically. On failure (disk full, ...) the old file is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointWriteError(
                f"writing {path} failed ({e}); the previous checkpoint, if any, is intact"
            ) from e
        raise


def load_checkpoint(path: Path) -> dict:
    """Load a resume checkpoint (tensors and plain Python data only: weights_only=True, no pickle code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLock:
    """An exclusive lock on a run folder; released by the OS when the process dies."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.read(fd, 64).decode().strip() or "?"
            finally:
                os.close(fd)
            raise RuntimeError(
                f"another training run (pid {owner}) is writing to {self.path.parent}; "
                "wait for it to finish or choose another --out folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
