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
import pytest

from conftest import TINY_OVERRIDES
from pipeline import artifacts, feature_table, inputs, layout
from pipeline.data import LABEL_COLUMNS
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
    for k in range(3):
        # Both ranks trained: each step took a batch per rank, so an epoch needed half the single run's steps ...
        ddp_steps = artifacts.read_state(ddp / "finetune" / f"fold_{k}")["stats"]["global_step"]
        single_steps = artifacts.read_state(single_exp / "finetune" / f"fold_{k}")["stats"]["global_step"]
        assert ddp_steps < single_steps
        # ... and both scored a share of the fold-end pass.
        ranks = artifacts.read_state(ddp / "embed" / f"fold_{k}")["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["rows"] > 0 for r in ranks)


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
    stray = copy / "embed" / "fold_1" / f".train.parquet.999999999.x{artifacts.TEMP_SUFFIX}"  # a dead writer's
    stray.write_bytes(b"half")
    shutil.rmtree(copy / "embed" / "fold_2")
    (copy / "embed" / layout.TRAIN_FEATURES).unlink()
    fold_0_file = copy / "embed" / "fold_0" / "train.parquet"
    mtime = fold_0_file.stat().st_mtime_ns
    resumed = cfg.copy()
    resumed.paths.output_dir = str(tmp_path)
    resumed.paths.exp_dir = str(copy)
    embed.run(resumed)
    assert fold_0_file.stat().st_mtime_ns == mtime  # finished fold not redone
    assert artifacts.read_state(copy / "embed" / "fold_2")["done"]
    assert not stray.exists()
    original = feature_table.read_feature_table(exp / "embed" / layout.TRAIN_FEATURES).matrices
    again = feature_table.read_feature_table(copy / "embed" / layout.TRAIN_FEATURES).matrices
    for name in original:
        np.testing.assert_array_equal(original[name], again[name])


def copy_experiment(exp: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the shared tiny experiment (and its demo data) under tmp_path, for runs that change it."""
    shutil.copytree(exp, tmp_path / name)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    return tmp_path / name


def test_two_rank_sharded_embed_equals_one_process(tmp_path, model_cache, tiny_experiment):
    """torchrun with 2 gloo processes: each rank scores a share of every pass (recorded per fold and per test
    pass), and the gathered features equal the one-process features."""
    cfg, exp, _ = tiny_experiment
    copy = copy_experiment(exp, tmp_path, cfg.exp_name)
    for k in range(cfg.cv.n_folds):
        shutil.rmtree(copy / "embed" / f"fold_{k}")
    for folder in (copy / "embed").glob("test_*"):
        shutil.rmtree(folder)
    (copy / "embed" / layout.TRAIN_FEATURES).unlink()
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
         "pipeline", "stage=embed", *cli(tmp_path, model_cache, f"exp_name={cfg.exp_name}")])
    single = feature_table.read_feature_table(exp / "embed" / layout.TRAIN_FEATURES).matrices
    sharded = feature_table.read_feature_table(copy / "embed" / layout.TRAIN_FEATURES).matrices
    assert set(single) == set(sharded)
    for name in single:
        np.testing.assert_allclose(sharded[name], single[name], atol=2e-3, rtol=1e-2)
    manifest = artifacts.read_json(copy / "embed" / layout.MANIFEST)
    for k in range(cfg.cv.n_folds):
        ranks = manifest["train"][f"fold_{k}"]["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["rows"] > 0 for r in ranks)
        assert sum(r["rows"] for r in ranks) == manifest["train"][f"fold_{k}"]["n_train_rows"]
    [test_folder] = (copy / "embed").glob("test_*")
    [reference_folder] = (exp / "embed").glob("test_*")
    assert set(artifacts.read_json(test_folder / layout.MANIFEST)["ranks"]["fold_0"]) == {"0", "1"}
    test_sharded = feature_table.read_feature_table(test_folder / layout.TEST_FEATURES).matrices
    test_single = feature_table.read_feature_table(reference_folder / layout.TEST_FEATURES).matrices
    for name in test_single:
        np.testing.assert_allclose(test_sharded[name], test_single[name], atol=2e-3, rtol=1e-2)
    assert not (copy / "embed" / "shards").exists() or not any((copy / "embed" / "shards").rglob("*.parquet"))


def test_subset_of_folds_then_the_rest_equals_one_full_run(tmp_path, model_cache, tiny_experiment):
    """finetune.folds=[0,2] then finetune.folds=[1] (as two jobs would): the same adapters' OOF as one run, and
    embed / stack pick the folds up through their done-markers."""
    from pipeline.stages import finetune, stack

    cfg, reference, _ = tiny_experiment
    base = cfg.copy()
    base.paths.output_dir = str(tmp_path)
    base.paths.exp_dir = str(tmp_path / cfg.exp_name)
    base.paths.demo_dir = str(tmp_path / "demo_data")
    shutil.copytree(reference.parent / "demo_data", tmp_path / "demo_data")
    first = base.copy()
    first.finetune.folds = [0, 2]
    assert finetune.run(first) == {"pending_folds": [1]}
    rest = base.copy()
    rest.finetune.folds = [1]
    metrics = finetune.run(rest)
    np.testing.assert_array_equal(oof_probs(tmp_path / cfg.exp_name), oof_probs(reference))
    assert metrics["oof_logloss"] == pytest.approx(
        json.loads((reference / "metrics.json").read_text())["finetune"]["oof_logloss"])
    assert embed.run(base)["refreshed_folds"] == []  # every fold's features came from its fold-end pass
    reference_stack = json.loads((reference / "metrics.json").read_text())["stack"]["oof_logloss"]
    assert stack.run(base)["oof_logloss"] == pytest.approx(reference_stack, abs=1e-6)


def test_predict_with_the_averaged_adapter_scores_every_test_row(tiny_experiment, tmp_path):
    """embed.test_adapters=averaged: one pass with the averaged adapter, a full submission, and the default
    (every fold adapter) submission left as it was in its own test folder."""
    from pipeline.stages import predict

    cfg, exp, _ = tiny_experiment
    copy = copy_experiment(exp, tmp_path, cfg.exp_name)
    averaged = cfg.copy()
    averaged.paths.output_dir = str(tmp_path)
    averaged.paths.exp_dir = str(copy)
    averaged.paths.demo_dir = str(tmp_path / "demo_data")
    averaged.embed.test_adapters = "averaged"
    metrics = predict.run(averaged)
    submission = pd.read_csv(copy / "submission.csv")
    test = pd.read_csv(inputs.data_paths(averaged).test)
    assert metrics["test_adapters"] == "averaged" and list(submission["id"]) == list(test["id"])
    np.testing.assert_allclose(submission[list(LABEL_COLUMNS)].sum(axis=1), 1, rtol=1e-6)
    folders = sorted((copy / "embed").glob("test_*"))
    assert len(folders) == 2  # the default's test features and the averaged adapter's, side by side
    manifest = artifacts.read_json(next(f for f in folders if (f / "averaged.parquet").exists()) / layout.MANIFEST)
    assert manifest["adapters"] == [str(copy / "finetune" / "averaged" / "adapter")]
    assert artifacts.read_state(copy / "finetune" / "averaged")["done"]
