"""stage=embed: make sure every fold's OOF features (and a test file's) exist for the current embed settings.

The finetune stage already writes each fold's features at the end of the fold (its held-out scoring pass is the
embed pass), so after a fine-tune this stage only gathers them into `embed/train_features.parquet`. It runs
model passes only for what is missing or was made with other embed settings (e.g. `embed.layers` changed): the
base model is loaded once and the fold adapters are swapped on it. Test features are averaged over the folds.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import artifacts, extraction, folds, inputs, setups

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    exp = artifacts.exp_dir(cfg)
    train, test = inputs.load_train(cfg), inputs.load_test(cfg)
    fold_of = folds.load_or_create(exp, train.frame, cfg.cv.n_folds, cfg.seed, cfg.cv.group_by)["fold"].to_numpy()
    ft_states = extraction.finetune_fold_states(exp, cfg)
    setup = setups.embed_setup(cfg, ft_states[0])
    artifacts.write_manifest(exp, cfg, "embed")
    if not artifacts.is_main_process():
        return {}
    stage_dir = exp / "embed"
    # Features are derived from the finished adapters: a fold made with other embed settings is simply redone.
    missing = [k for k in range(cfg.cv.n_folds) if not extraction.is_current(stage_dir / f"fold_{k}", setup)]
    test_path = inputs.data_paths(cfg)[1]
    test_job = (test, extraction.test_dir(stage_dir, test_path, setup)) if test is not None else None
    extraction.extract_missing(cfg, exp, ft_states, setup, (train, fold_of, missing), test_job)
    ids = train.frame["id"].to_numpy().astype(str)
    width = extraction.combine_train(stage_dir, cfg, ids, train.frame["label"].to_numpy())
    if test_job is not None:
        extraction.average_test(test_job[1], test, cfg, ft_states)
    metrics = {"n_train_rows": int(len(ids)), "n_test_rows": 0 if test is None else int(len(test.frame)),
               "hidden_size": width, "layers": [float(f) for f in cfg.embed.layers], "refreshed_folds": missing,
               "seconds": round(sum(artifacts.read_state(stage_dir / f"fold_{k}").get("seconds", 0.0)
                                    for k in range(cfg.cv.n_folds)), 2)}
    print(f"embed: {metrics['n_train_rows']} OOF rows, {metrics['n_test_rows']} test rows, vectors of width {width} "
          f"at layers {metrics['layers']} (passes run for folds: {missing or 'none needed'})")
    return metrics
