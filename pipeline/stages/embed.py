"""stage=embed: make sure every fold's OOF features (and a test file's) exist for the current embed settings.

The finetune stage already writes each fold's features at the end of the fold (its held-out scoring pass is the
embed pass), so after a fine-tune this stage only gathers them into `embed/train_features.parquet`. It runs
model passes only for what is missing or was made with other embed settings (e.g. `embed.layers` changed): the
base model is loaded once and the fold adapters are swapped on it. Under torchrun every rank scores a share of
the rows. Test features are averaged over the fold adapters (or scored once by their average,
`embed.test_adapters=averaged`).
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import artifacts, context, embed_passes, feature_table, locks, setups

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    ctx = context.open_run(cfg, "embed")
    # Every fold lock is held: no fine-tune job is writing an adapter or fold features this stage reads.
    with locks.folds([ctx.layout.finetune_fold(k) for k in range(ctx.n_folds)], "stage=embed reading the adapters"):
        return gather(ctx)


def gather(ctx: context.RunContext) -> dict:
    cfg, lay = ctx.cfg, ctx.layout
    ft_states = feature_table.finetune_fold_states(ctx)
    setup = setups.embed_setup(cfg, ft_states[0])
    # Features are derived from the finished adapters: a fold made with other embed settings is simply redone.
    missing = [k for k in range(ctx.n_folds) if not feature_table.is_current(lay.embed_fold(k), setup)]
    embed_passes.extract_missing(ctx, ft_states, setup, missing, with_test=True)
    if not ctx.is_main:
        return {}
    width = embed_passes.combine_train(ctx)
    if ctx.test is not None:
        embed_passes.finish_test(ctx, feature_table.test_folder(ctx, ft_states[0]), ft_states)
    metrics = {"n_train_rows": int(len(ctx.ids)), "n_test_rows": 0 if ctx.test is None else int(len(ctx.test.frame)),
               "hidden_size": width, "layers": [float(f) for f in cfg.embed.layers], "refreshed_folds": missing,
               "test_adapters": cfg.embed.test_adapters, "world_size": ctx.world_size,
               "seconds": round(sum(artifacts.read_state(lay.embed_fold(k)).get("seconds", 0.0)
                                    for k in range(ctx.n_folds)), 2)}
    artifacts.update_metrics(lay.root, "embed", metrics)
    log.info("embed: %d OOF rows, %d test rows, vectors of width %s at layers %s (passes run for folds: %s)",
             metrics["n_train_rows"], metrics["n_test_rows"], width, metrics["layers"], missing or "none needed")
    return metrics
