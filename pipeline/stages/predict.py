"""stage=predict: score a test file with a finished experiment (fold adapters + stacker boosters).

Only what is missing runs: test features are extracted once per test file (each fold adapter, averaged) and
reused afterwards; the saved boosters and reductions of `stack/` are applied with the settings they were trained
with (stack/model.json), not the current command line's.
"""
from __future__ import annotations

import pickle

import lightgbm as lgb
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, inputs
from pipeline.errors import UserError
from pipeline.stages import embed as embed_stage
from pipeline.stages.stack import SUBMISSION, score_with_models, stacker_inputs, vector_kinds, write_submission


def load_stacker(stack_dir) -> tuple[DictConfig, list[tuple]]:
    model_file = stack_dir / "model.json"
    if not model_file.exists():
        raise UserError(f"{model_file} not found; run stage=stack (or stage=all) for this experiment first")
    saved = artifacts.read_json(model_file)
    models = []
    for k in range(saved["n_folds"]):
        fold_dir = stack_dir / f"fold_{k}"
        booster = lgb.Booster(model_file=str(fold_dir / "booster.txt"))
        reducer = pickle.loads((fold_dir / "reducer.pkl").read_bytes())
        models.append((booster, reducer))
    return OmegaConf.create(saved["stack"]), models


def run(cfg: DictConfig) -> dict:
    exp = artifacts.exp_dir(cfg)
    test = inputs.load_test(cfg)
    if test is None:
        raise UserError("stage=predict needs a test file: add data.test=PATH")
    test_path = inputs.data_paths(cfg)[1]
    stack_cfg, models = load_stacker(exp / "stack")
    matrices = embed_stage.ensure_test_features(cfg, exp, test, test_path)
    probs = score_with_models(models, stacker_inputs(test.frame, matrices, stack_cfg), stack_cfg.symmetric,
                              vector_kinds(matrices))
    submission = exp / SUBMISSION
    if artifacts.is_main_process():
        write_submission(submission, test.frame["id"].to_numpy(), probs)
        artifacts.write_manifest(exp, cfg, "predict")
    metrics = {"n_rows": int(len(test.frame)), "test": str(test_path), "submission": str(submission),
               "n_repaired": test.n_repaired}
    if artifacts.is_main_process():
        artifacts.update_metrics(exp, "predict", metrics)
    print(f"predict: {metrics['n_rows']} rows scored -> {submission}")
    return metrics
