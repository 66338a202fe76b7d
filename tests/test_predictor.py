"""Predictor (Python API) and stage=export: the same probabilities as the submission stage=all / stage=predict
write, from an experiment folder or from a self-contained export with no training data, read-only, no pickle."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_OVERRIDES, compose_cfg
from pipeline import Predictor, inputs
from pipeline.llm import modeling
from pipeline.data import LABEL_COLUMNS
from pipeline.errors import UserError
from pipeline.stages import export, stack

ROOT = Path(__file__).resolve().parents[1]


def experiment_copy(tiny_experiment, tmp_path: Path):
    """A copy of the shared tiny experiment whose submission.csv is the demo test file's (stack re-run on it)."""
    cfg, exp, _ = tiny_experiment
    shutil.copytree(exp, tmp_path / cfg.exp_name)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={cfg.paths.model_cache_dir}",
                       f"exp_name={cfg.exp_name}"])
    stack.run(cfg)
    test = pd.read_csv(inputs.data_paths(cfg).test)
    submission = pd.read_csv(Path(cfg.paths.exp_dir) / "submission.csv")
    return cfg, Path(cfg.paths.exp_dir), test, submission[list(LABEL_COLUMNS)].to_numpy()


def no_pickles(folder: Path) -> None:
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".txt", ".npz", ".md", ".jinja"}, suffixes


def test_predictor_on_the_experiment_equals_the_submission(tiny_experiment, tmp_path):
    cfg, exp, test, submission = experiment_copy(tiny_experiment, tmp_path)
    predictor = Predictor.load(exp)
    probs = predictor.predict_proba(test)
    np.testing.assert_array_equal(probs, submission)
    frame = predictor.predict(test.to_dict("records"))  # a list of dicts works too
    assert list(frame.columns) == ["id", *LABEL_COLUMNS] and list(frame["id"]) == list(test["id"].astype(str))
    info = predictor.info
    assert info["source"] == "experiment" and info["n_folds"] == 3 and info["stack_oof_logloss"] > 0
    feats = predictor.features(test)
    np.testing.assert_allclose(feats.head.sum(axis=1), 1, rtol=1e-3)
    assert feats.vectors["h100_a_fwd"].shape == (len(test), int(cfg.model.tiny.hidden_size))


def test_export_scores_exactly_like_the_experiment_with_no_training_data_read_only(tiny_experiment, tmp_path):
    """stage=export, then the experiment and its data deleted: Predictor.load(export) gives the submission's
    numbers bit for bit, writes nothing into the export, and the export holds no pickle."""
    cfg, exp, test, submission = experiment_copy(tiny_experiment, tmp_path)
    metrics = export.run(compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", "stage=export",
                                      f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}",
                                      f"export.dir={tmp_path / 'kaggle_dataset'}"]))
    assert metrics["mode"] == "adapters" and metrics["n_folds"] == 3
    folder = tmp_path / "kaggle_dataset"
    no_pickles(folder)
    assert "out-of-fold log loss" in (folder / "README.md").read_text()
    shutil.rmtree(exp)
    shutil.rmtree(tmp_path / "demo_data")
    before = {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}
    predictor = Predictor.load(folder)
    np.testing.assert_array_equal(predictor.predict_proba(test), submission)
    assert {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert predictor.info["source"] == "export" and predictor.info["mode"] == "adapters"


def test_merged_export_is_a_plain_transformers_classifier(tiny_experiment, tmp_path):
    """export.model=merged: AutoModelForSequenceClassification.from_pretrained(export/model) with the pipeline's
    formatting gives the logits of the averaged adapter on the base model (the `score` head survived the merge),
    and the export's predictions stay close to the every-adapter submission."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import embed_passes
    from pipeline.formatting import encode_frame
    from pipeline.llm.inference import forward_pass
    from pipeline.predictor import as_pair_data

    cfg, exp, test, submission = experiment_copy(tiny_experiment, tmp_path)
    predictor = Predictor.load(exp)
    predictor.export(tmp_path / "merged", mode="merged")
    no_pickles(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged" / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged" / "model")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = encode_frame(tokenizer, as_pair_data(test).frame, cfg.model)
    cpu = torch.device("cpu")
    got = forward_pass(plain.eval(), rows, tokenizer.pad_token_id, 4096, cpu, torch.float32).logits
    averaged = tmp_path / "averaged" / "adapter"
    embed_passes.average_adapters(predictor.adapters, averaged)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    reference = modeling.load_with_adapter(source, cfg.model, predictor.tokenizer, averaged, torch.float32, cpu)
    expected = forward_pass(reference, rows, predictor.tokenizer.pad_token_id, 4096, cpu, torch.float32).logits
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    merged = Predictor.load(tmp_path / "merged")
    assert merged.adapters == [] and merged.info["mode"] == "merged"
    probs = merged.predict_proba(test)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-9)
    assert np.abs(probs - submission).max() < 0.2  # one averaged pass instead of K: close, not equal


def test_broken_or_hostile_exports_are_one_error(tiny_experiment, tmp_path):
    cfg, exp, test, _ = experiment_copy(tiny_experiment, tmp_path)
    folder = tmp_path / "export"
    Predictor.load(exp).export(folder)
    (folder / "stack" / "fold_1" / "pca.npz").unlink()
    with pytest.raises(UserError, match=r"fold_1/pca.npz not found; the export is incomplete"):
        Predictor.load(folder)
    record = json.loads((folder / "export.json").read_text())
    record["stack"]["members"]["text"]["estimator"]["_target_"] = "os.system"
    (folder / "export.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="os.system"):
        Predictor.load(folder)
    (folder / "export.json").write_text("{not json")
    with pytest.raises(UserError, match="export.json is missing or damaged"):
        Predictor.load(folder)
    with pytest.raises(UserError, match="neither an export"):
        Predictor.load(tmp_path / "nowhere")


def test_export_on_the_command_line(tiny_experiment, tmp_path):
    cfg, exp, _, _ = experiment_copy(tiny_experiment, tmp_path)
    args = [sys.executable, "-m", "pipeline", "stage=export", *TINY_OVERRIDES, f"paths.output_dir={tmp_path}",
            f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (exp / "export" / "export.json").is_file()
    assert json.loads((exp / "metrics.json").read_text())["export"]["dir"] == str(exp / "export")
    bad = subprocess.run([*args, "export.model=zip"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: export.model=zip")


@pytest.mark.parametrize("mode", ["adapters", "merged"])
def test_the_model_card_says_what_the_export_holds(mode):
    """The README an export carries: the base model and formatting, the classifier as exported, the rows and folds,
    both OOF figures (n/a when missing), the stage-two members and the command that made it."""
    from pipeline.predictor import model_card

    record = {"info": {"mode": mode, "n_folds": 3, "n_train_rows": 1200, "finetune_oof_logloss": 1.0386,
                       "stack_oof_logloss": None, "made_by": ["stage=export", "export.model=" + mode]},
              "model": {"name": "smollm2-135m", "path": None, "source": "gguf_package", "max_length": 192,
                        "prompt_max_fraction": 0.3, "truncation_side": "left", "show_model_names": mode == "merged"},
              "stack": {"blend_members": ["head", "text"]}}
    card = model_card(record)
    assert card.startswith("# Pairwise preference classifier (smollm2-135m)")
    assert "- base model: smollm2-135m (gguf_package), formatting: max_length 192, prompt share 0.3, truncation left" \
        in card
    assert ("the base model plus the 3 fold LoRA adapters" in card) == (mode == "adapters")
    assert ("averaged and merged into the base weights" in card) == (mode == "merged")
    assert ("rows need model_a / model_b" in card) == (mode == "merged")
    assert "- trained on 1200 labelled pairs, 3 prompt-grouped folds" in card
    assert "- out-of-fold log loss: head 1.0386, stacker n/a" in card
    assert "- stage two: head, text," in card and f"- made by: stage=export export.model={mode}" in card
