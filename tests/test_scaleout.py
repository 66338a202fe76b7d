"""Scaling out and faults: torchrun (gloo on CPU), Hydra multirun, SIGKILL-and-resume, determinism."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import TINY_OVERRIDES
from pipeline import artifacts
from pipeline.data import LABEL_COLUMNS
from pipeline import extraction
from pipeline.stages import embed

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def cli(out: Path, cache: Path, *args: str) -> list[str]:
    return [*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={cache}", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tree(folder: Path) -> set[str]:
    skip = ("logs", "manifests")
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.parts[len(folder.parts)]
            not in skip}


def oof_probs(exp: Path, stage: str = "finetune") -> np.ndarray:
    return pd.read_parquet(exp / stage / "oof.parquet")[list(LABEL_COLUMNS)].to_numpy()


def test_torchrun_two_processes_same_layout_as_single(tmp_path, model_cache, tiny_experiment):
    _, single_exp, _ = tiny_experiment
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
         "pipeline", "stage=finetune", *cli(tmp_path, model_cache, "exp_name=ddp")])
    ddp = tmp_path / "ddp"
    single = {p for p in tree(single_exp) if p.startswith(("finetune/", "folds.parquet"))}
    assert {p for p in tree(ddp) if p.startswith(("finetune/", "folds.parquet"))} == single
    oof = pd.read_parquet(ddp / "finetune" / "oof.parquet")
    assert oof["id"].is_unique and len(oof) == len(pd.read_parquet(single_exp / "folds.parquet"))
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["finetune"]["oof_logloss"] > 0


def test_multirun_keeps_each_jobs_results_apart(tmp_path, tiny_experiment):
    cfg, exp, _ = tiny_experiment
    before = (exp / "metrics.json").read_text()
    result = run([sys.executable, "-m", "pipeline", "-m", "stage=stack",
                  *cli(Path(cfg.paths.output_dir), Path(cfg.paths.model_cache_dir), f"exp_name={cfg.exp_name}"),
                  "stack.vectors.pca_components=2,6"])
    jobs = sorted((exp / "multirun").glob("*/*/stack/metrics.json"))
    assert len(jobs) == 2, result.stdout
    settings = [json.loads((j.parent / "model.json").read_text())["stack"]["vectors"]["pca_components"]
                for j in jobs]
    assert sorted(settings) == [2, 6]
    assert all((j.parent / "oof.parquet").exists() and (j.parent / "report.md").exists() for j in jobs)
    assert (exp / "metrics.json").read_text() == before  # the experiment's own stack result is untouched


def test_sigkill_in_finetune_then_resume_gives_same_result(tmp_path, model_cache, tiny_experiment):
    _, reference, _ = tiny_experiment
    command = [sys.executable, "-m", "pipeline", "stage=finetune", *cli(tmp_path, model_cache, "exp_name=shared")]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold_0 = tmp_path / "shared" / "finetune" / "fold_0"
    deadline = time.time() + 300
    while time.time() < deadline and not (artifacts.read_state(fold_0) or {}).get("done"):
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (artifacts.read_state(fold_0) or {}).get("done"), "fold 0 never finished"
    assert not (artifacts.read_state(tmp_path / "shared" / "finetune" / "fold_2") or {}).get("done")
    stats_0 = artifacts.read_state(fold_0)["stats"]
    result = run(command)
    assert "fold 0: done, skipped" in result.stderr + result.stdout
    assert artifacts.read_state(fold_0)["stats"] == stats_0
    # Same seed on CPU: identical OOF probabilities to the uninterrupted run of the same config.
    np.testing.assert_array_equal(oof_probs(tmp_path / "shared"), oof_probs(reference))


def test_embed_resumes_only_missing_folds_after_a_kill(tmp_path, tiny_experiment):
    cfg, exp, _ = tiny_experiment
    copy = tmp_path / cfg.exp_name
    shutil.copytree(exp, copy)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    # What a kill during fold 1 leaves: fold 1 started (state not done) with a stray temp file, fold 2 absent.
    artifacts.write_json(copy / "embed" / "fold_1" / "state.json",
                         {**artifacts.read_state(copy / "embed" / "fold_1"), "done": False})
    (copy / "embed" / "fold_1" / ".train.parquet.x.tmp").write_bytes(b"half")
    shutil.rmtree(copy / "embed" / "fold_2")
    (copy / "embed" / extraction.TRAIN_FEATURES).unlink()
    fold_0_file = copy / "embed" / "fold_0" / "train.parquet"
    mtime = fold_0_file.stat().st_mtime_ns
    resumed = cfg.copy()
    resumed.paths.output_dir = str(tmp_path)
    resumed.paths.exp_dir = str(copy)
    embed.run(resumed)
    assert fold_0_file.stat().st_mtime_ns == mtime  # finished fold not redone
    assert artifacts.read_state(copy / "embed" / "fold_2")["done"]
    _, original = artifacts.read_feature_table(exp / "embed" / extraction.TRAIN_FEATURES)
    _, again = artifacts.read_feature_table(copy / "embed" / extraction.TRAIN_FEATURES)
    for name in original:
        np.testing.assert_array_equal(original[name], again[name])
