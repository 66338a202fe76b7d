"""The per-experiment artifact folder: atomic writes, metrics.json, run manifest, done-markers.

A killed run must never leave a half-written file that a later stage trusts: every file is written to a
temporary name in the same folder and renamed into place, and a stage folder only counts as finished when its
`state.json` (written last) says so.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline import dist, locks
from pipeline.errors import UserError
from pipeline.layout import DONE, STATE_FILE, Layout

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "lightgbm", "hydra-core", "pandas", "numpy",
                    "scikit-learn", "bitsandbytes", "deepspeed")


def exp_dir(cfg: DictConfig, writable: bool = True) -> Path:
    """The experiment folder: created (when this run writes it) and cleaned of dead writers' temp files."""
    path = Path(cfg.paths.exp_dir)
    if dist.is_main_process() and writable:
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


TEMP_SUFFIX = ".pipeline-tmp"  # only files with this suffix are ever cleaned up: never a user's own *.tmp


def remove_stale_temp_files(folder: Path, name: str | None = None) -> list[Path]:
    """Temp files and staging folders left by a killed writer (`.NAME.PID.XXXX.pipeline-tmp` whose PID is gone):
    removed on the next run. Called on an experiment folder (whose name was checked to stay inside
    paths.output_dir), searched through; with `name`, only that target's own leftovers directly in `folder` (an
    export folder's parent, which holds the user's other files)."""
    removed = []
    found = folder.glob(f".{name}.*{TEMP_SUFFIX}") if name else folder.rglob(f".*{TEMP_SUFFIX}")
    for tmp in sorted(found, key=lambda p: len(p.parts), reverse=True):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in parts[2:-1] if p.isdigit()), None)
        if pid is None or _pid_alive(pid) or not tmp.exists():
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _user_file_mode() -> int:
    """What a plain open() would give a new file under the user's umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_user_mode(folder: Path) -> None:
    """Give a folder written by a library (safetensors writes 0600, mkdtemp makes 0700) the modes a plain open()
    and mkdir() would under the user's umask, as every other artifact has."""
    file_mode = _user_file_mode()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r: a folder one can read is one one can list
    os.chmod(folder, dir_mode)
    for path in folder.rglob("*"):
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _user_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_metrics(exp: Path) -> dict[str, Any]:
    path = Layout(exp).metrics
    if not path.exists():
        return {}
    try:
        return read_json(path)
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON); delete it: every stage rewrites its entry when it runs") \
            from None


def update_metrics(exp: Path, stage: str, metrics: dict[str, Any]) -> None:
    """Set `metrics.json[stage]`, keeping the other stages' entries (a locked read-modify-write: parallel fold
    jobs finish at any time)."""
    with locks.shared_files(exp):
        current = read_metrics(exp)
        current[stage] = metrics
        write_json(Layout(exp).metrics, current)


def drop_metrics(exp: Path, stage: str) -> None:
    """Remove a stage's entry whose results no longer exist (e.g. predict after the stacker was refitted)."""
    with locks.shared_files(exp):
        current = read_metrics(exp)
        if current.pop(stage, None) is not None:
            write_json(Layout(exp).metrics, current)


def staging_dir(target: Path) -> Path:
    """A fresh folder beside `target` to write a unit of results into, private to this process."""
    staging = target.parent / f".{target.name}.{os.getpid()}.new{TEMP_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written folder into place: the old one is renamed aside first and removed after, so a kill
    leaves either the old or the new folder under `target`, never a mix."""
    old = target.parent / f".{target.name}.{os.getpid()}.old{TEMP_SUFFIX}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def config_hash(obj: Any) -> str:
    """Stable short hash of a config subtree (DictConfig or plain data)."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | Path | None) -> str | None:
    """Content hash of an input file, so artifacts made from other data are detected. Every setup check asks for
    it, so it is hashed once per process while the file's size and modification time stay the same."""
    if path is None:
        return None
    stat = os.stat(path)
    return _content_hash(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _content_hash(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def read_state(folder: Path) -> dict[str, Any] | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        state = read_json(path)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise UserError(f"{path} is damaged (not a JSON object); delete {folder} to redo that part")
    return state


def read_parquet(path: Path, how_to_fix: str) -> pd.DataFrame:
    """A parquet artifact, or one `error:` line that names it when it is missing or damaged."""
    if not path.exists():
        raise UserError(f"{path} not found; {how_to_fix}")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise UserError(f"{path} is damaged ({type(exc).__name__}); {how_to_fix}") from None


def mark_started(folder: Path, setup: dict[str, Any]) -> None:
    """A folder whose work has begun: not reusable until `mark_done` (written last) says so."""
    write_json(folder / STATE_FILE, {DONE: False, **setup})


def mark_done(folder: Path, state: dict[str, Any]) -> None:
    write_json(folder / STATE_FILE, {DONE: True, **state})


# Setup keys added after experiments already existed: a state made before them is not checked on that key.
ADDED_LATER = ("base_model",)


def changed_setup(state: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The setup keys whose recorded value differs from `expected`."""
    return [k for k, v in expected.items() if state.get(k) != v and not (k in ADDED_LATER and k not in state)]


def describe_changes(state: dict[str, Any], expected: dict[str, Any], settings: dict[str, Any] | None) -> str:
    """`key: old -> new` for each changed key; a changed settings hash is told as the dotted settings that differ
    when the state recorded them."""
    parts = []
    for key in changed_setup(state, expected):
        if key == "config_hash" and settings is not None and isinstance(state.get("settings"), dict):
            parts += [f"{name}: {old!r} -> {new!r}" for name, old, new in differing_values(state["settings"],
                                                                                          settings)]
        else:
            parts.append(f"{key}: {state.get(key)!r} -> {expected[key]!r}")
    return ", ".join(parts)


def differing_values(recorded: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded, current) for every leaf that differs between two nested settings dicts."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_values(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_state(folder: Path, expected: dict[str, Any], how_to_fix: str, settings: dict | None = None) -> bool:
    """True when `folder` is finished; False when it is absent or unfinished. Raises when it was finished with a
    different setup than `expected` (mixing them would silently corrupt results). An unfinished folder never
    blocks: a run that crashed on a bad setting must not stop the corrected one."""
    state = read_state(folder)
    if not state or not state.get(DONE):
        return False
    if changed_setup(state, expected):
        raise UserError(f"{folder} was made with a different setup ({describe_changes(state, expected, settings)}); "
                        f"{how_to_fix}")
    return True


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(folder: Path, cfg: DictConfig, stage: str) -> None:
    """Record how a stage was run (resolved config, seed, versions, commit, command line) in folder/manifests/."""
    if not dist.is_main_process():
        return
    write_json(Layout(folder).manifest(stage), {
        "stage": stage,
        "seed": int(cfg.seed),
        "argv": sys.argv,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })


