"""stage=export and the Predictor as a demanding user (and an interrupted upload) meets them: an export replaces only
an earlier export and keeps what the user added to it, leaves nothing behind when it fails, and a damaged or
tampered export is one UserError naming the file."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Predictor, artifacts, predictor as predictor_module
from pipeline.errors import UserError
from pipeline.stages import export
from test_predictor import experiment_copy


@pytest.fixture
def exported(tiny_experiment, tmp_path):
    cfg, exp, test, submission = experiment_copy(tiny_experiment, tmp_path)
    folder = tmp_path / "export"
    Predictor.load(exp).export(folder)
    return cfg, exp, test, submission, folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["experiment", "output_dir", "fold", "user_folder", "file"])
def test_export_never_replaces_what_it_did_not_make(tiny_experiment, tmp_path, where):
    """export.dir naming the experiment, a folder above it, a folder inside it, a folder of the user's, or a file is
    refused before anything is written, and every file there stays as it was."""
    cfg, exp, _, _ = experiment_copy(tiny_experiment, tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me")
    target = {"experiment": exp, "output_dir": exp.parent, "fold": exp / "finetune" / "fold_0",
              "user_folder": user, "file": tmp_path / "a_file"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="export.dir="):
        export.run(_with_export_dir(cfg, target))
    assert snapshot(tmp_path) == before


def _with_export_dir(cfg, target: Path):
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"export": {"dir": str(target)}, "stage": "export"})


def test_a_re_export_replaces_the_earlier_export_and_keeps_the_users_wheels(exported):
    """README's Kaggle flow: export, add wheels/, export again: the export is new, wheels/ is still there."""
    cfg, exp, test, submission, folder = exported
    (folder / "wheels").mkdir()
    (folder / "wheels" / "preference_pipeline-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    (folder / "stack" / "stale.txt").write_text("made by the old export")
    Predictor.load(exp).export(folder)
    assert (folder / "wheels" / "preference_pipeline-0.1.0-py3-none-any.whl").read_bytes() == b"wheel"
    assert not (folder / "stack" / "stale.txt").exists()
    np.testing.assert_array_equal(Predictor.load(folder).predict_proba(test), submission)
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(artifacts.TEMP_SUFFIX)]


def test_disk_full_during_export_is_one_error_and_leaves_nothing(exported, monkeypatch):
    """A copy that fails with ENOSPC (shutil.Error from copytree, whose errno is None): one UserError, no staging
    folder left, and the earlier export (with the user's files) untouched."""
    cfg, exp, _, _, folder = exported
    (folder / "wheels").mkdir()
    (folder / "wheels" / "w.whl").write_bytes(b"wheel")
    before = snapshot(folder)

    def full_disk(src, dst, *args, **kwargs):
        raise shutil.Error([(str(src), str(dst), str(OSError(errno.ENOSPC, "No space left on device")))])

    monkeypatch.setattr(predictor_module.shutil, "copytree", full_disk)
    with pytest.raises(UserError, match="No space left on device.*nothing was replaced"):
        Predictor.load(exp).export(folder)
    assert snapshot(folder) == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".export.")]


def test_a_killed_exports_staging_folder_is_cleaned_by_the_next(exported):
    cfg, exp, _, _, folder = exported
    dead = folder.parent / f".export.999999999.new{artifacts.TEMP_SUFFIX}"
    (dead / "model").mkdir(parents=True)
    (dead / "model" / "weights.bin").write_bytes(b"0" * 1000)
    Predictor.load(exp).export(folder)
    assert not dead.exists()


def test_a_merged_export_leaves_no_temp_folder(exported):
    cfg, exp, _, _, folder = exported
    before = set(Path(tempfile.gettempdir()).glob("averaged_*"))
    Predictor.load(exp).export(folder.parent / "merged", mode="merged")
    assert set(Path(tempfile.gettempdir()).glob("averaged_*")) == before


@pytest.mark.parametrize("damage", ["truncated_pca", "missing_booster", "truncated_booster", "missing_tokenizer",
                                    "swapped_adapter", "truncated_weights"])
def test_a_damaged_or_tampered_export_is_one_error_naming_the_file(exported, tiny_experiment, tmp_path, damage):
    cfg, exp, _, _, folder = exported
    if damage == "truncated_pca":
        path = folder / "stack" / "fold_1" / "pca.npz"
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "missing_booster":
        path = next((folder / "stack" / "fold_0").glob("booster*.txt"))
        path.unlink()
    elif damage == "truncated_booster":
        path = next((folder / "stack" / "fold_0").glob("booster*.txt"))
        path.write_text(path.read_text()[:200])
    elif damage == "missing_tokenizer":
        path = folder / "model" / "tokenizer.json"
        path.unlink()
    elif damage == "swapped_adapter":
        # Another experiment's adapter of the same shape: every weight moved a little.
        from safetensors.torch import load_file, save_file

        path = folder / "adapters" / "fold_1" / "adapter_model.safetensors"
        save_file({k: v + 1e-3 for k, v in load_file(str(path)).items()}, str(path))
    else:
        path = next((folder / "model").glob("*.safetensors"))
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=str(path.relative_to(folder.parent)).replace(".", r"\.")):
        Predictor.load(folder)


def test_an_export_without_adapters_or_for_a_missing_gpu_is_refused_at_load(exported):
    cfg, exp, _, _, folder = exported
    record = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**record, "adapters": []}))
    with pytest.raises(UserError, match="adapters export lists its fold adapters"):
        Predictor.load(folder)
    (folder / "export.json").write_text(json.dumps(record))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            Predictor.load(folder, device="cuda")
    with pytest.raises(UserError, match="not a device"):
        Predictor.load(folder, device="gpu0")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_exporting_from_a_read_only_experiment_is_refused_before_writing(tiny_experiment, tmp_path):
    cfg, exp, _, _ = experiment_copy(tiny_experiment, tmp_path)
    target = tmp_path / "out"
    os.chmod(exp, 0o555)
    try:
        with pytest.raises(UserError, match="read-only"):
            export.run(_with_export_dir(cfg, target))
    finally:
        os.chmod(exp, 0o755)
    assert not target.exists()


def test_exporting_from_a_read_only_experiment_is_refused_before_writing_as_root(tiny_experiment, tmp_path,
                                                                                  monkeypatch):
    """The same refusal where the OS would let root write anyway: the check asks os.access, patched here."""
    cfg, exp, _, _ = experiment_copy(tiny_experiment, tmp_path)
    target = tmp_path / "out"
    real = os.access
    monkeypatch.setattr(export.os, "access", lambda p, mode: False if Path(p) == exp else real(p, mode))
    with pytest.raises(UserError, match="read-only"):
        export.run(_with_export_dir(cfg, target))
    assert not target.exists()


def test_metrics_say_what_is_true_after_embed_and_a_re_stack(exported):
    """metrics.json has the embed entry README lists (world_size) even when the fold passes made every feature, and
    a re-stack drops the export entry that described the old stacker."""
    from pipeline.stages import embed, stack

    cfg, exp, _, _, folder = exported
    embed.run(cfg)
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics["embed"]["world_size"] == 1 and metrics["embed"]["refreshed_folds"] == []
    artifacts.update_metrics(exp, "export", {"dir": str(folder)})
    stack.run(cfg)
    assert "export" not in json.loads((exp / "metrics.json").read_text())


def test_a_refused_stack_leaves_every_record_as_it_was(tiny_experiment, tmp_path):
    """stage=stack refused (features made with other settings) changes no file of the experiment, and
    Predictor.load(experiment) still scores exactly as before."""
    from omegaconf import OmegaConf

    from pipeline.stages import stack

    cfg, exp, test, submission = experiment_copy(tiny_experiment, tmp_path)
    before = snapshot(exp)
    with pytest.raises(UserError, match="other settings"):
        stack.run(OmegaConf.merge(cfg, {"model": {"max_length": 64}}))
    assert snapshot(exp) == before
    np.testing.assert_array_equal(Predictor.load(exp).predict_proba(test), submission)
