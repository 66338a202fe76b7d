"""Who may write what in an experiment folder at the same time (README "Concurrency").

- The experiment lock (`.lock` in the experiment folder) is held for the whole run by every stage that writes
  the experiment's shared artifacts (check, embed, stack, predict, all): a second such run on the same
  experiment fails at once with an `error:` naming the holder's PID.
- A fold lock (`finetune/fold_k/.lock`) is held while fold k is trained and scored, so K `stage=finetune
  finetune.folds=[k]` jobs (one GPU each) run side by side; embed and predict hold every fold lock while they
  read the adapters, so they never read a fold that a fine-tune job is still writing.
- Short read-modify-writes of shared files (metrics.json, folds.parquet, finetune/oof.parquet) wait for a brief
  lock (`.shared.lock`) instead of failing.

The locks are `filelock` locks (fcntl on Unix: released by the OS when a process dies, so a killed run never
leaves a stale lock). Only rank 0 of a torchrun job takes them; the other ranks write nothing shared.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from pipeline import dist
from pipeline.errors import UserError

EXPERIMENT_LOCK = ".lock"
SHARED_LOCK = ".shared.lock"
SHARED_WAIT_S = 120.0  # the brief lock guards seconds of work; waiting longer means something is wrong

_held: dict[str, FileLock] = {}  # lock path -> lock held by this process (stage=all nests stages)


def _owner_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def holder(lock_path: Path) -> str:
    """Who holds a lock, as its owner file says (written right after acquiring)."""
    try:
        owner = json.loads(_owner_file(lock_path).read_text(encoding="utf-8"))
        return f"PID {owner['pid']} on {owner['host']} ({owner['what']}, since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def hold(lock_path: Path, what: str, busy: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold `lock_path` for the block. When another process holds it (after waiting `wait_s`), one `error:` line:
    `busy` plus the holder. Re-entrant within a process."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_path.resolve())
    if key in _held or not os.access(lock_path.parent, os.W_OK) or not dist.is_main_process():
        # Already ours (stage=all runs the other stages), a read-only folder nobody can be writing, or a torchrun
        # rank other than 0 (it writes nothing shared; rank 0 holds the lock for the job).
        yield
        return
    lock = FileLock(str(lock_path), timeout=wait_s)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{busy}: {lock_path.parent} is in use by {holder(lock_path)}; wait for it to finish "
                        "(README: Concurrency)") from None
    _held[key] = lock
    try:
        _owner_file(lock_path).write_text(json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
             "since": time.strftime("%Y-%m-%d %H:%M:%S")}), encoding="utf-8")
        yield
    finally:
        _held.pop(key, None)
        lock.release()


def experiment(root: Path, stage: str) -> "contextmanager":
    """The experiment lock, for a stage that writes shared artifacts."""
    return hold(root / EXPERIMENT_LOCK, f"stage={stage}",
                f"stage={stage} cannot run now: another stage is writing this experiment")


def fold(fold_dir: Path, k: int, what: str) -> "contextmanager":
    """Fold k's lock, held while its adapter and features are written (or read by embed / predict)."""
    return hold(fold_dir / EXPERIMENT_LOCK, what, f"fold {k} is busy")


@contextmanager
def folds(fold_dirs: list[Path], what: str) -> Iterator[None]:
    """Every listed fold's lock at once (embed / predict reading the adapters)."""
    with ExitStack() as stack:
        for k, fold_dir in enumerate(fold_dirs):
            stack.enter_context(fold(fold_dir, k, what))
        yield


def shared_files(root: Path) -> "contextmanager":
    """The brief lock for a read-modify-write of a shared file; waits instead of failing."""
    return hold(root / SHARED_LOCK, "updating shared files", "shared files stayed locked", wait_s=SHARED_WAIT_S)
