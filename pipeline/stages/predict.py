"""stage=predict: score a test file with a finished experiment.

Test features are extracted once per test file (each fold adapter on one loaded base model, averaged; or the
averaged adapter once with `embed.test_adapters=averaged`) and reused afterwards; under torchrun every rank scores
a share of the rows. The stacker is refitted from the experiment's stored OOF features with the settings recorded
in `stack/model.json` (deterministic, seconds): no pickled object is ever loaded, so an experiment folder from
someone else cannot run code. The command line must agree with the recorded setup (model, formatting, embed, cv,
seed, train file); a differing key is an `error:`, never a silently different submission.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, context, extraction, layout, setups, stacking
from pipeline.errors import UserError

def differing_keys(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts."""
    keys = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def recorded_config(cfg: DictConfig, lay: layout.Layout) -> DictConfig:
    """The command line's config with the stacker's recorded settings, after checking the rest agrees."""
    model_file = lay.stack / layout.MODEL_FILE
    if not artifacts.read_state(lay.stack) or not model_file.exists():
        raise UserError(f"{lay.stack} holds no finished stacker; run stage=stack (or stage=all) first")
    saved = artifacts.read_json(model_file)
    differ = differing_keys(saved["setup"], setups.stack_setup(cfg))
    if differ:
        raise UserError(f"this command line differs from the settings the stacker of {lay.root} was trained with: "
                        f"{', '.join(differ)}; drop those overrides (or re-run stage=all)")
    return OmegaConf.merge(cfg, {"stack": saved["stack"]})


def run(cfg: DictConfig) -> dict:
    if cfg.data.test is None and cfg.data.train is not None:
        raise UserError("stage=predict needs a test file: add data.test=PATH")
    cfg = recorded_config(cfg, layout.Layout.of(cfg))
    ctx = context.open_run(cfg, "predict")
    extraction.ensure_test_features(ctx)
    if not ctx.is_main:
        return {}
    result = stacking.score(ctx, with_test=True, baselines=False)
    stacking.write_submission(ctx.layout.submission, result["_test_ids"], result["_test"])
    metrics = {"n_rows": int(len(ctx.test.frame)), "test": str(ctx.test_path), "submission": str(ctx.layout.submission),
               "n_repaired": ctx.test.n_repaired, "test_adapters": cfg.embed.test_adapters}
    artifacts.update_metrics(ctx.layout.root, "predict", metrics)
    print(f"predict: {metrics['n_rows']} rows scored -> {ctx.layout.submission}")
    return metrics
