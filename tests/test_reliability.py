"""Hostile-user cases (issue 17): one writer per experiment, every fold and input fingerprinted, nothing from an
experiment folder runs code, and one `error:` line wherever a traceback used to be."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig

from conftest import TINY_OVERRIDES
from pipeline import artifacts, data, inputs, locks, validation
from pipeline.stage_two import store
from pipeline.llm import modeling
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.stages import check, embed, finetune, predict, stack

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def copied(cfg: DictConfig, exp: Path, tmp_path: Path, **changes) -> DictConfig:
    """A copy of the shared tiny experiment (and its demo data) under tmp_path, and its config."""
    import shutil

    shutil.copytree(exp, tmp_path / cfg.exp_name)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    out = cfg.copy()
    out.paths.output_dir = str(tmp_path)
    out.paths.exp_dir = str(tmp_path / cfg.exp_name)
    out.paths.demo_dir = str(tmp_path / "demo_data")
    for key, value in changes.items():
        section, name = key.split("__")
        out[section][name] = value
    return out


def cli_args(cfg: DictConfig, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *TINY_OVERRIDES, f"paths.output_dir={cfg.paths.output_dir}",
            f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}", *extra]


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def new_test_file(cfg: DictConfig, tmp_path: Path, n: int = 5) -> Path:
    test = pd.read_csv(inputs.data_paths(cfg).test).head(n).copy()
    test["id"] = [f"fresh-{i}" for i in range(n)]
    path = tmp_path / "fresh_test.csv"
    test.to_csv(path, index=False)
    return path


def tree_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every artifact (the locks' own files aside: taking a lock is not a write)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith((locks.EXPERIMENT_LOCK, locks.SHARED_LOCK))}


# -------------------------------------------------------------------- 1. folds trained with other settings
def test_a_fold_job_with_other_settings_is_refused_before_training(tiny_cfg):
    """The README's K-folds-as-K-jobs loop with one mistyped job: the second job refuses at once, naming the
    setting, instead of training beside a fold of another learning rate."""
    cfg = tiny_cfg("exp_name=mixed", "finetune.folds=[1]", "finetune.learning_rate=1e-4")
    finetune.run(cfg)
    other = tiny_cfg("exp_name=mixed", "finetune.folds=[0]")
    with pytest.raises(UserError, match=r"fold_1 was made with a different setup \(finetune.learning_rate: "
                                        r"0.0001 -> 0.0005\)"):
        finetune.run(other)
    assert not (Path(cfg.paths.exp_dir) / "finetune" / "fold_0" / "state.json").exists()


def test_every_stage_checks_every_fold_it_reads(tiny_experiment, tmp_path):
    """Fold 2 (not fold 0) trained with another learning rate: embed, stack and predict all refuse, naming it."""
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path)
    state_path = Path(cfg.paths.exp_dir) / "finetune" / "fold_2" / "state.json"
    state = json.loads(state_path.read_text())
    state["config_hash"] = "0" * 16
    state["settings"]["finetune"]["learning_rate"] = 1e-4
    state_path.write_text(json.dumps(state))
    for stage in (embed, stack):
        with pytest.raises(UserError, match=r"fold 2's adapter .* other settings .*finetune.learning_rate: 0.0001 "
                                            r"-> 0.0005"):
            stage.run(cfg)
    fresh = cfg.copy()
    fresh.data.test = str(new_test_file(cfg, tmp_path))
    with pytest.raises(UserError, match="fold 2's adapter"):
        predict.run(fresh)


# -------------------------------------------------------------------------------------- 2. one writer
def test_a_second_writer_of_the_experiment_fails_naming_the_holder(tiny_experiment, tmp_path):
    """While a process holds the experiment lock, stage=stack in another process exits 2 with one line naming
    the holder's PID, and leaves the experiment's results as they were."""
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path)
    root = Path(cfg.paths.exp_dir)
    before = tree_snapshot(root / "stack")
    with locks.experiment(root, "stack"):
        result = run_cli(cli_args(cfg, "stage=stack"))
    line = one_error_line(result)
    assert f"in use by PID {os.getpid()}" in line and "stage=stack" in line
    assert tree_snapshot(root / "stack") == before


def test_a_second_job_on_a_busy_fold_fails_naming_the_holder(tiny_cfg):
    cfg = tiny_cfg("exp_name=busy", "finetune.folds=[0]")
    fold_dir = Path(cfg.paths.exp_dir) / "finetune" / "fold_0"
    with locks.fold(fold_dir, 0, "a test holding fold 0"):
        result = run_cli(cli_args(cfg, "stage=finetune", "finetune.folds=[0]"))
    line = one_error_line(result)
    assert "fold 0 is busy" in line and f"PID {os.getpid()}" in line
    assert not (fold_dir / "adapter").exists()


def test_two_stack_runs_at_once_leave_one_consistent_result(tiny_experiment, tmp_path):
    """Two stage=stack runs with different members started together: each either finishes or is refused by the
    lock, and stack/ holds the model, OOF, state and metrics of one and the same run."""
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path)
    runs = [subprocess.Popen(cli_args(cfg, "stage=stack", f"stack.blend_members={members}"), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for members in ("[head,text]", "[head,summary]")]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    assert any(code == 0 for code, _ in results), results
    for code, stderr in results:
        # The holder's PID is named once its lock file is written; a refusal a moment before says "another process".
        assert code == 0 or "is in use by" in stderr, stderr[-2000:]
    root = Path(cfg.paths.exp_dir)
    model = json.loads((root / "stack" / "model.json").read_text())
    metrics = json.loads((root / "metrics.json").read_text())
    assert artifacts.read_state(root / "stack")["done"]
    assert metrics["stack"]["features"]["blend_members"] == model["stack"]["blend_members"]
    oof = pd.read_parquet(root / "stack" / "oof.parquet")
    assert artifacts.read_state(root / "stack")["oof_logloss"] == pytest.approx(metrics["stack"]["oof_logloss"])
    assert len(oof) == len(pd.read_parquet(root / "folds.parquet"))
    assert not list(root.glob(".stack.*"))  # no staging folder left behind


def _write_metrics(exp: str, prefix: str, n: int) -> None:
    for i in range(n):
        artifacts.update_metrics(Path(exp), f"{prefix}{i}", {"i": i})


def test_metrics_updates_from_parallel_processes_are_never_lost(tmp_path):
    """metrics.json is read-modified-written under the shared-files lock: two processes writing 25 entries each
    leave all 50."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_metrics, args=(str(tmp_path), prefix, 25)) for prefix in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert len(artifacts.read_metrics(tmp_path)) == 50


def test_k_fold_jobs_in_parallel_then_stage_all_picks_both_up(tiny_cfg):
    """Two fine-tune processes on different folds at the same time both finish; stage=all then trains only the
    missing fold and runs to the end."""
    cfg = tiny_cfg("exp_name=parallel")
    jobs = [subprocess.Popen(cli_args(cfg, "stage=finetune", f"finetune.folds={folds_}"), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for folds_ in ("[0]", "[1]")]
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read()[-3000:]
    root = Path(cfg.paths.exp_dir)
    stats = {k: artifacts.read_state(root / "finetune" / f"fold_{k}")["stats"] for k in (0, 1)}
    result = run_cli(cli_args(cfg, "stage=all"))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "fold 0: done, skipped" in output and "fold 1: done, skipped" in output
    assert {k: artifacts.read_state(root / "finetune" / f"fold_{k}")["stats"] for k in (0, 1)} == stats
    assert artifacts.read_state(root / "finetune" / "fold_2")["done"]
    assert json.loads((root / "metrics.json").read_text())["stack"]["oof_logloss"] > 0


# -------------------------------------------------------------------------------- 3. base weights replaced
def test_new_base_weights_under_the_same_path_are_refused(tiny_experiment, tmp_path):
    """After the fine-tune, the base model's weights are re-saved (same shapes, new values) where model.path
    points: predict on a new test file refuses instead of scoring with adapters trained on other weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg, exp, _ = tiny_experiment
    cache = tmp_path / "models"
    shutil.copytree(cfg.paths.model_cache_dir, cache)
    cfg = copied(cfg, exp, tmp_path / "exp", paths__model_cache_dir=str(cache))
    cfg.data.test = str(new_test_file(cfg, tmp_path))
    base = Path(modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir))
    before = modeling.base_model_fingerprint(base)
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    assert modeling.base_model_fingerprint(base) != before
    with pytest.raises(UserError, match=r"fold 0's adapter .*\(base_model: '\w+' -> '\w+'\)"):
        predict.run(cfg)


def test_fingerprint_ignores_copies_and_sees_edits_between_samples_of_large_files(tmp_path):
    """A copy of a model folder (new times, same bytes) keeps its fingerprint; a large file's sampled regions
    and its size are covered."""
    import shutil

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    blob = np.random.default_rng(0).integers(0, 255, modeling.WHOLE_FILE_BYTES + (4 << 20), dtype=np.uint8)
    (folder / "model.safetensors").write_bytes(blob.tobytes())
    first = modeling.base_model_fingerprint(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert modeling.base_model_fingerprint(copy) == first
    blob[modeling.HEAD_BYTES + 10] ^= 1  # inside the first sample after the header
    (copy / "model.safetensors").write_bytes(blob.tobytes())
    assert modeling.base_model_fingerprint(copy) != first


# ---------------------------------------------------------------------------------------- 4. extra leaks
def test_extra_rows_copying_train_pairs_under_new_ids_are_refused(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    train = pd.read_csv(inputs.data_paths(cfg).train)
    copies = train.head(4).copy()
    copies["id"] = [f"other-{i}" for i in range(4)]
    copies.loc[copies.index[2:], ["response_a", "response_b"]] = \
        copies.loc[copies.index[2:], ["response_b", "response_a"]].to_numpy()  # two of them A/B-swapped
    fresh = train.head(3).copy()
    fresh["id"] = ["new-0", "new-1", "new-2"]
    fresh["prompt"] = fresh["prompt"].str.replace("]", ', "and more"]', regex=False)
    extra = tmp_path / "extra.csv"
    pd.concat([fresh, copies]).to_csv(extra, index=False)
    leaky = tiny_cfg(f"data.extra={extra}")
    parsed = data.load_pairs(inputs.data_paths(cfg).train, with_labels=True)
    with pytest.raises(UserError, match=r"extra.csv: 4 rows are pairs of data.train under other ids .*first ids "
                                        r"other-0, other-1, other-2"):
        inputs.load_extra(leaky, parsed)
    with pytest.raises(UserError, match="4 rows are pairs of data.train"):
        check.run(leaky)  # refused at check time, before any fine-tune
    pd.concat([fresh]).to_csv(extra, index=False)
    assert len(inputs.load_extra(leaky, parsed).frame) == 3


def test_pair_keys_mirror_under_swap():
    frame = pd.DataFrame({"id": ["1"], "prompt": [["p"]], "response_a": [["x"]], "response_b": [["y"]]})
    swapped = frame.assign(response_a=[["y"]], response_b=[["x"]], id=["2"])
    assert data.pair_keys(frame)[0] == data.pair_keys(swapped, swap=True)[0] != data.pair_keys(swapped)[0]
    assert data.shared_pairs(swapped, frame) == ["2"]


# -------------------------------------------------------------------------------------------- 5. exp_name
@pytest.mark.parametrize("name", ["..", "../../x", "", ".", "a/b", " x"])
def test_exp_names_leaving_the_output_folder_are_refused(tiny_cfg, name):
    cfg = tiny_cfg()
    cfg.exp_name = name
    with pytest.raises(UserError, match="exp_name="):
        validation.validate(cfg)


def test_exp_name_dotdot_on_the_command_line_writes_nothing_outside(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    user_file = tmp_path / ".notes.999999999.tmp"
    user_file.write_text("mine")
    result = run_cli([sys.executable, "-m", "pipeline", "stage=check", "model=tiny", "exp_name=..",
                      f"paths.output_dir={out}", f"paths.model_cache_dir={tmp_path / 'models'}"])
    assert "exp_name='..'" in one_error_line(result)
    assert user_file.exists() and not (tmp_path / "folds.parquet").exists()


# ---------------------------------------------------------------------------- 6. no code from the folder
@pytest.mark.parametrize("estimator", [
    {"_target_": "torch.load", "f": "payload.pt", "weights_only": False},
    {"_target_": "builtins.open", "file": "victim.txt", "mode": "w"},
    {"_target_": "sklearn.linear_model.LogisticRegression", "_args_": [1]},
    {"_target_": "sklearn.utils.Bunch"},
])
def test_an_edited_model_json_cannot_name_code_to_run(tiny_experiment, tmp_path, estimator):
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    model_file = Path(cfg.paths.exp_dir) / "stack" / "model.json"
    model = json.loads(model_file.read_text())
    model["stack"]["members"]["text"]["estimator"] = estimator
    model_file.write_text(json.dumps(model))
    with pytest.raises(UserError, match="model.json"):
        predict.run(cfg)
    assert victim.read_text() == "precious"


def test_trusted_classifiers_are_scikit_learn_and_lightgbm_classes_only():
    assert store.is_trusted_classifier("sklearn.svm.SVC")
    assert store.is_trusted_classifier("lightgbm.LGBMClassifier")
    assert not store.is_trusted_classifier("sklearn.linear_model.LinearRegression")  # not a classifier
    assert not store.is_trusted_classifier("os.system")
    assert not store.is_trusted_classifier("sklearn.nonexistent.Thing")


# -------------------------------------------------------------------------------- 7. read-only experiment
def test_predict_with_predict_dir_writes_nothing_into_the_experiment(tiny_experiment, tmp_path):
    """A read-only experiment (a Kaggle dataset) is scored with paths.predict_dir: the submission, test
    features, metrics and manifest go there, and no file of the experiment changes."""
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path / "input")
    cfg.data.test = str(new_test_file(cfg, tmp_path))
    cfg.paths.predict_dir = str(tmp_path / "working")
    before = tree_snapshot(Path(cfg.paths.exp_dir))
    metrics = predict.run(cfg)
    assert tree_snapshot(Path(cfg.paths.exp_dir)) == before
    submission = pd.read_csv(tmp_path / "working" / "submission.csv")
    assert metrics["submission"] == str(tmp_path / "working" / "submission.csv") and len(submission) == 5
    assert json.loads((tmp_path / "working" / "metrics.json").read_text())["predict"]["n_rows"] == 5
    assert list((tmp_path / "working" / "embed").glob("test_*/features.parquet"))


def test_predict_on_a_read_only_experiment_says_what_to_set(tiny_experiment, tmp_path, monkeypatch):
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path)
    cfg.data.test = str(new_test_file(cfg, tmp_path))
    root = Path(cfg.paths.exp_dir)
    real_access = os.access
    # Tests run as root, for whom chmod does not make a folder read-only: the check is what is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == root else real_access(path, mode))
    with pytest.raises(UserError, match="read-only; set paths.predict_dir="):
        predict.run(cfg)


def test_file_system_refusals_are_one_line_naming_the_path():
    from pipeline.__main__ import os_error_message

    message = os_error_message(PermissionError(13, "Permission denied", "/kaggle/input/exp/metrics.json"))
    assert message.startswith("cannot write /kaggle/input/exp/metrics.json: Permission denied")
    assert os_error_message(OSError(30, "Read-only file system", "/x")).startswith("cannot write /x")
    assert os_error_message(FileNotFoundError(2, "No such file", "/y")) is None  # a bug: traceback wanted


# ------------------------------------------------------------------------- 8. damaged or unsafe weights
def test_truncated_adapter_is_one_error_naming_the_file(tiny_experiment, tmp_path):
    cfg, exp, _ = tiny_experiment
    cfg = copied(cfg, exp, tmp_path)
    cfg.data.test = str(new_test_file(cfg, tmp_path))
    weights = Path(cfg.paths.exp_dir) / "finetune" / "fold_1" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"fold_1/adapter/adapter_model.safetensors is damaged"):
        predict.run(cfg)


def test_pickled_weights_are_never_loaded(tmp_path):
    """Only safetensors are read: a folder with only `adapter_model.bin` / `pytorch_model.bin` is refused before
    any loader sees the pickle (whose payload would write a file)."""
    class Payload:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned.txt", "ran"))

    for name, config in (("adapter_model.bin", "adapter_config.json"), ("pytorch_model.bin", "config.json")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / config).write_text(json.dumps({"model_type": "llama"}))
        torch.save({"w": Payload()}, folder / name)
        weights = "adapter_model.safetensors" if name.startswith("adapter") else "*.safetensors"
        with pytest.raises(UserError, match=f"only pickled weights \\({name}\\)"):
            modeling.check_weights_folder(folder, weights, config)
    assert not (tmp_path / "pwned.txt").exists()


def test_config_naming_unknown_custom_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoModelForSequenceClassification": "modeling_evil.Evil"}}))
    with pytest.raises(UserError, match="config.json names custom code"):
        modeling.check_weights_folder(tmp_path, "*.safetensors", "config.json")


def test_damaged_base_model_on_the_command_line(tiny_cfg, tmp_path, model_cache):
    """A base model folder with truncated weights: stage=finetune prints one line naming the file."""
    import shutil

    cfg = tiny_cfg()
    source = Path(modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir))
    broken = tmp_path / "broken_model"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli([sys.executable, "-m", "pipeline", "stage=finetune", *TINY_OVERRIDES, f"model.path={broken}",
                      f"paths.output_dir={tmp_path / 'out'}", f"paths.model_cache_dir={model_cache}"])
    assert "model.safetensors is damaged" in one_error_line(result)


# ------------------------------------------------------------------------------------------------ 9. Ctrl-C
# Runs the command line with fold 1's training interrupted by a SIGINT the process sends itself as that fold starts:
# a known point after fold 0 finished, whatever the machine's speed (a timed signal raced the tiny fine-tune).
# Python turns SIGINT into KeyboardInterrupt only where the process started with SIGINT at its default, as in a
# terminal; a shell's background job (`pytest &`) starts with it ignored, so the child restores what a terminal gives.
INTERRUPT_AT_FOLD_1 = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from pipeline.llm import training
real, calls = training.train_adapter, []
def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)
training.train_adapter = interrupted
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""


def test_ctrl_c_is_one_line_and_a_rerun_resumes(tiny_cfg):
    """Ctrl-C during fold 1: one `error:` line and exit 130, fold 0 kept as finished; re-running the same command
    skips fold 0 and ends with the OOF an uninterrupted run gives, bit for bit."""
    cfg = tiny_cfg("exp_name=interrupted")
    args = cli_args(cfg, "stage=finetune")
    result = subprocess.run([sys.executable, "-c", INTERRUPT_AT_FOLD_1, *args[3:]], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    line = one_error_line(result, code=130)
    assert "interrupted: stage=finetune" in line and "resumes" in line
    lay = Layout.of(cfg)
    assert artifacts.read_state(lay.finetune_fold(0))["done"] and not lay.finetune_oof.exists()
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "fold 0: done, skipped" in resumed.stderr + resumed.stdout
    reference = tiny_cfg("exp_name=uninterrupted")
    assert run_cli(cli_args(reference, "stage=finetune")).returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(lay.finetune_oof), pd.read_parquet(Layout.of(reference).finetune_oof))


# --------------------------------------------------------------------------- 10. stage two checked early
def test_group_by_that_stage_two_cannot_split_fails_at_check(tiny_cfg, tmp_path):
    """cv.group_by=source with two sources and 2 folds: each training set is one source, so stage two could
    choose nothing on an inner split. stage=check says so, before any fine-tune."""
    cfg = tiny_cfg()
    train = pd.read_csv(inputs.data_paths(cfg).train)
    train["source"] = np.where(np.arange(len(train)) < 0.7 * len(train), "big", "small")
    path = tmp_path / "sources.csv"
    train.to_csv(path, index=False)
    with pytest.raises(UserError, match="stage two cannot choose anything for fold 0.*stack.inner_folds"):
        check.run(tiny_cfg(f"data.train={path}", "cv.group_by=source", "cv.n_folds=2"))


# ----------------------------------------------------------------------------------- 11. file reading
@pytest.mark.parametrize("suffix, compress", [
    (".csv.gz", "gzip"), (".csv.bz2", "bz2"), (".csv.xz", "xz"), (".zip", "zip"), (".csv", "gzip")])
def test_compressed_csv_is_read_as_pandas_would(tiny_cfg, tmp_path, suffix, compress):
    train = pd.read_csv(inputs.data_paths(tiny_cfg()).train)
    path = tmp_path / f"train{suffix}"
    train.to_csv(path, index=False, compression={"method": compress, "archive_name": "train.csv"}
                 if compress == "zip" else compress)
    assert len(data.load_pairs(path, with_labels=True).frame) == len(train)


def test_a_folder_given_as_the_train_file_is_named_as_one(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        data.load_pairs(tmp_path, with_labels=True)


def test_error_line_starts_a_new_line_after_a_progress_bar(capsys):
    from tqdm import tqdm

    from pipeline.__main__ import print_error

    bar = tqdm(total=10, desc="scoring")
    bar.update(3)
    print_error("something is wrong")
    err = capsys.readouterr().err
    assert "\nerror: something is wrong\n" in err or err.startswith("error:")
    assert [line for line in err.splitlines() if "error:" in line] == ["error: something is wrong"]


# -------------------------------------------------------------------------------------------- 12. modes
def test_adapter_files_get_the_users_normal_mode(tiny_experiment):
    cfg, exp, _ = tiny_experiment
    expected = artifacts._user_file_mode()  # what open() gives a new file under this umask
    for k in range(cfg.cv.n_folds):
        for path in (exp / "finetune" / f"fold_{k}" / "adapter").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ------------------------------------------------------------------------------------------ 13. booleans
def test_parquet_with_boolean_label_columns(tiny_cfg, tmp_path):
    train = pd.read_csv(inputs.data_paths(tiny_cfg()).train)
    for column in data.LABEL_COLUMNS:
        train[column] = train[column].astype(bool)
    path = tmp_path / "train.parquet"
    train.to_parquet(path, index=False)
    parsed = data.load_pairs(path, with_labels=True)
    expected = np.argmax(train[list(data.LABEL_COLUMNS)].to_numpy(), axis=1)
    np.testing.assert_array_equal(parsed.frame["label"].to_numpy(), expected)
    assert parsed.repairs["label_format"] == len(train)


# ------------------------------------------------------------------------------ 14. folds and labels
def test_check_with_another_seed_than_the_folds_is_refused(tiny_cfg):
    check.run(tiny_cfg("exp_name=seeded"))
    with pytest.raises(UserError, match=r"folds.parquet was assigned with other settings \(seed: 42 -> 7"):
        check.run(tiny_cfg("exp_name=seeded", "seed=7"))


def test_a_file_with_a_single_label_is_warned_about(tiny_cfg, tmp_path, caplog):
    train = pd.read_csv(inputs.data_paths(tiny_cfg()).train)
    train[list(data.LABEL_COLUMNS)] = [1, 0, 0]
    path = tmp_path / "all_a.csv"
    train.to_csv(path, index=False)
    metrics = check.run(tiny_cfg(f"data.train={path}", "exp_name=single"))
    assert metrics["train"]["warnings"] == ["every row is labelled 'a'"]
    assert "every one of the" in caplog.text


# ------------------------------------------------------------------- late errors that stage=check catches first
@pytest.mark.parametrize("overrides, fragment", [
    (["stack.blend_members=[head,text,likelihood]"], "embed.lm_features=true"),
    (["embed.max_length=20"], "embed.max_length=20 leaves no room"),
    (["model.max_length=20"], "model.max_length=20 leaves no room"),
    (["+finetune.lora.layers_to_transform=[1,7]",
      "finetune.lora.target_modules=[q_proj,v_proj]"], "[7] are not layers of this model"),
    (["+finetune.lora.layers_to_transform=[9]", "finetune.lora.target_modules=[q_proj]"],
     "[9] are not layers of this model"),
    (["+finetune.lora.layers_to_transform=[1]", "finetune.lora.target_modules=all-linear"], "needs a list of modules"),
    (["finetune.top_layers=1", "+finetune.lora.layers_to_transform=[1]", "finetune.lora.target_modules=[q_proj]"],
     "finetune.top_layers=1 and finetune.lora.layers_to_transform=[1] both choose the trained layers"),
    (["finetune.top_layers=0"], "finetune.top_layers=0"),
    (["finetune.top_layers=abc"], "finetune.top_layers=abc"),
    (["finetune.top_layers=1", "finetune.lora.target_modules=.*proj"], "use all-linear or a list of modules"),
    (["check.gpu_memory_gb=abc"], "check.gpu_memory_gb=abc"),
    (["check.gpu_memory_gb=null"], "check.gpu_memory_gb=None"),
    (["check.gpu_memory_gb=0"], "check.gpu_memory_gb=0"),
    (["check.gpu_memory_gb=-5"], "check.gpu_memory_gb=-5"),
])
def test_settings_that_would_fail_late_fail_at_check(tiny_cfg, overrides, fragment):
    """Each of these used to pass stage=check and fail after the fine-tune (or in a PEFT / Hydra traceback)."""
    with pytest.raises(UserError) as caught:
        check.run(tiny_cfg(*overrides))
    assert fragment in str(caught.value)
