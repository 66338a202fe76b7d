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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError
from pipeline.layout import DONE, STATE_FILE, Layout
TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "lightgbm", "hydra-core", "pandas", "numpy",
                    "scikit-learn", "bitsandbytes", "deepspeed")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only rank 0 writes artifacts under torchrun / accelerate."""
    return rank() == 0


def exp_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.exp_dir)
    if is_main_process():
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


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temp files left by a killed writer (`.NAME.PID.XXXX.tmp` whose PID is gone): removed on the next run."""
    removed = []
    for tmp in folder.rglob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in parts[2:-1] if p.isdigit()), None)
        if pid is not None and not _pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _user_file_mode() -> int:
    """What a plain open() would give a new file under the user's umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
    """Set `metrics.json[stage]`, keeping the other stages' entries."""
    current = read_metrics(exp)
    current[stage] = metrics
    write_json(Layout(exp).metrics, current)


def drop_metrics(exp: Path, stage: str) -> None:
    """Remove a stage's entry whose results no longer exist (e.g. predict after the stacker was refitted)."""
    current = read_metrics(exp)
    if current.pop(stage, None) is not None:
        write_json(Layout(exp).metrics, current)


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written folder into place: the old one is renamed aside first and removed after, so a kill
    leaves either the old or the new folder under `target`, never a mix."""
    old = target.parent / f".{target.name}.old"
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


def check_state(folder: Path, expected: dict[str, Any], how_to_fix: str) -> bool:
    """True when `folder` is finished; False when it is absent or unfinished. Raises when it was finished with a
    different setup than `expected` (mixing them would silently corrupt results). An unfinished folder never
    blocks: a run that crashed on a bad setting must not stop the corrected one."""
    state = read_state(folder)
    if not state or not state.get(DONE):
        return False
    changed = [k for k, v in expected.items() if state.get(k) != v]
    if changed:
        details = ", ".join(f"{k}: {state.get(k)!r} -> {expected[k]!r}" for k in changed)
        raise UserError(f"{folder} was made with a different setup ({details}); {how_to_fix}")
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
    if not is_main_process():
        return
    write_json(Layout(folder).manifest(stage), {
        "stage": stage,
        "seed": int(cfg.seed),
        "argv": sys.argv,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })


def write_feature_table(path: str | Path, columns: dict[str, Any], matrices: dict[str, Any], dtype: str) -> None:
    """Parquet with scalar columns plus fixed-width vector columns (one list per row) stored as `dtype`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: pa.array(np.asarray(values)) for name, values in columns.items()}
    for name, matrix in matrices.items():
        matrix = np.ascontiguousarray(matrix, dtype=dtype)
        arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)


@dataclass
class FeatureTable:
    scalars: pd.DataFrame            # id, fold, ... (one value per row)
    matrices: dict[str, Any]         # name -> (rows, width) float32


def read_feature_table(path: str | Path) -> FeatureTable:
    """Inverse of `write_feature_table`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise UserError(f"{path} is damaged ({type(exc).__name__}); delete it and re-run the stage that made it "
                        "(stage=embed for features)") from None
    scalars, matrices = {}, {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            matrices[name] = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
        else:
            scalars[name] = column.to_numpy(zero_copy_only=False)
    return FeatureTable(pd.DataFrame(scalars), matrices)
