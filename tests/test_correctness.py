"""Trust: bad settings and damaged artifacts are one `error:` line naming the key or file; results never mix
settings; artifacts get the user's normal permissions; ids are kept exactly."""
from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg
from pipeline import __main__ as cli
from pipeline import artifacts, feature_table, folds, validation
from pipeline.data import parse_frame
from pipeline.errors import UserError


@pytest.mark.parametrize("override, fragment", [
    ("cv.n_folds=abc", "cv.n_folds=abc"),
    ("cv.n_folds=1", "cv.n_folds=1"),
    ("finetune.per_device_batch_size=0", "finetune.per_device_batch_size=0"),
    ("model.precision=fp8", "model.precision=fp8"),
    ("embed.pooling=max", "embed.pooling=max"),
    ("embed.layers=[999]", "embed.layers=[999]"),
    ("embed.layers=[]", "embed.layers=[]"),
    ("embed.storage_dtype=int8", "embed.storage_dtype=int8"),
    ("stack.vectors.pca_components=-3", "stack.vectors.pca_components=-3"),
    ("stack.vectors.kinds=[diff,foo]", "foo"),
    ("stack.blend_members=[head,nope]", "nope"),
    ("stack.inner_folds=1", "stack.inner_folds=1"),
    ("finetune.folds=[0,7]", "finetune.folds"),
    ("embed.test_adapters=mean", "embed.test_adapters=mean"),
    ("embed.test_adapters=averaged +finetune.lora.use_dora=true", "use_dora"),
    ("model.path=/nonexistent/model", "model.path=/nonexistent/model"),
])
def test_every_bad_setting_is_refused_before_anything_runs(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validation.validate(compose_cfg(["model=tiny", *override.split()]))


def test_an_empty_model_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="no model there"):
        validation.validate(compose_cfg(["model=tiny", f"model.path={tmp_path}"]))


def test_defaults_and_every_experiment_validate():
    from pathlib import Path

    for experiment in sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment")
                             .glob("*.yaml")):
        cfg = compose_cfg([f"experiment={experiment}", "model.quantization=none"])
        if cfg.finetune.teacher is None:
            validation.validate(cfg)
            continue
        # A student names its teacher: training stages need it finished (here it is not), reading stages never.
        with pytest.raises(UserError, match="not a finished experiment"):
            validation.validate(cfg)
        validation.validate(compose_cfg([f"experiment={experiment}", "model.quantization=none", "stage=embed"]))


@pytest.mark.parametrize("argv, fragment", [
    (["finetune.epoch=2"], "finetune.epoch"),
    (["modell=tiny"], "modell"),
    (["model=tinyy"], "model/tinyy"),
])
def test_mistyped_keys_are_one_error_line_with_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.check_overrides(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0]


def test_multirun_arguments_are_left_to_hydra():
    cli.check_overrides(["-m", "stack.vectors.pca_components=4,8"])  # must not raise or exit


def test_ids_are_kept_exactly_and_a_null_id_names_its_row():
    raw = pd.DataFrame({"id": [" 5", "5"], "prompt": ["p", "p"], "response_a": ["a", "a"],
                        "response_b": ["b", "b"], "winner_model_a": [1, 0], "winner_model_b": [0, 1],
                        "winner_tie": [0, 0]})
    data = parse_frame(raw, "t.csv", with_labels=True)
    assert list(data.frame["id"]) == [" 5", "5"]
    raw.loc[1, "id"] = None
    with pytest.raises(UserError, match="t.csv: row 3: empty or null id"):
        parse_frame(raw, "t.csv", with_labels=True)


def test_artifacts_get_the_users_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        artifacts.write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_temp_files_of_killed_writers_are_cleaned_on_the_next_run(tmp_path):
    """Only the pipeline's own temp files of dead writers go: a live writer's stays, and so does a user's file
    that merely looks like a temp file (`.notes.999999999.tmp`)."""
    dead = tmp_path / "stack" / f".oof.parquet.999999999.abc{artifacts.TEMP_SUFFIX}"
    alive = tmp_path / f".metrics.json.{os.getpid()}.abc{artifacts.TEMP_SUFFIX}"
    users = tmp_path / ".notes.999999999.tmp"
    dead.parent.mkdir()
    for path in (dead, alive, users):
        path.write_text("content")
    removed = artifacts.remove_stale_temp_files(tmp_path)
    assert removed == [dead] and not dead.exists() and alive.exists() and users.exists()


@pytest.mark.parametrize("name, content, fragment", [
    ("state.json", "{not json", "state.json is damaged"),
    ("metrics.json", "{not json", "metrics.json is damaged"),
])
def test_damaged_json_artifacts_name_the_file(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=fragment):
        artifacts.read_state(tmp_path) if name == "state.json" else artifacts.read_metrics(tmp_path)


def test_damaged_folds_and_feature_files_name_the_file(tmp_path):
    (tmp_path / "folds.parquet").write_bytes(b"PAR1 broken")
    frame = pd.DataFrame({"id": ["1", "2"], "prompt": [["a"], ["b"]], "label": [0, 1]})
    with pytest.raises(UserError, match="folds.parquet is damaged"):
        folds.load_or_create(tmp_path, frame, 2, 0)
    (tmp_path / "features.parquet").write_bytes(b"garbage")
    with pytest.raises(UserError, match="features.parquet is damaged"):
        feature_table.read_feature_table(tmp_path / "features.parquet")


def test_too_few_rows_of_a_class_for_the_folds_is_a_user_error():
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    with pytest.raises(UserError, match="cannot split the train file into cv.n_folds=5 folds"):
        folds.assign_folds(labels, np.arange(7), 5, seed=0)


def test_group_by_a_column_keeps_each_value_in_one_fold():
    frame = pd.DataFrame({"prompt": [["p"]] * 30, "source": ["x"] * 10 + ["y"] * 10 + ["z"] * 10,
                          "label": [0, 1, 2] * 10})
    fold = folds.assign_folds(frame["label"].to_numpy(), folds.group_keys(frame, "source"), 3, seed=0)
    for source in "xyz":
        assert len(set(fold[frame["source"] == source])) == 1
    with pytest.raises(UserError, match="no column 'colour'"):
        folds.group_keys(frame, "colour")


def test_unfinished_fold_with_other_settings_does_not_block(tmp_path):
    artifacts.write_json(tmp_path / "state.json", {"done": False, "config_hash": "old"})
    assert artifacts.check_state(tmp_path, {"config_hash": "new"}, "fix") is False
    artifacts.mark_done(tmp_path, {"config_hash": "old"})
    with pytest.raises(UserError, match="different setup"):
        artifacts.check_state(tmp_path, {"config_hash": "new"}, "fix")


def test_stack_results_replace_as_one_unit(tmp_path):
    target = tmp_path / "stack"
    (target / "fold_0").mkdir(parents=True)
    (target / "fold_0" / "booster.txt").write_text("old")
    (target / "old_only.txt").write_text("old")
    staging = tmp_path / ".stack.new"
    (staging / "fold_0").mkdir(parents=True)
    (staging / "fold_0" / "booster.txt").write_text("new")
    artifacts.replace_dir(staging, target)
    assert (target / "fold_0" / "booster.txt").read_text() == "new"
    assert not (target / "old_only.txt").exists() and not staging.exists()
