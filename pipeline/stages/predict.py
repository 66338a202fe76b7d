"""stage=predict: score a test file with a finished experiment.

Test features are extracted once per test file (each fold adapter on one loaded base model, averaged) and reused
afterwards. The stacker is refitted from the experiment's stored OOF features with the settings recorded in
`stack/model.json` (deterministic, seconds): no pickled object is ever loaded, so an experiment folder from
someone else cannot run code. The command line must agree with the recorded setup (model, formatting, embed, cv,
seed, train file); a differing key is an `error:`, never a silently different submission.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, extraction, inputs, setups, stacking
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


def recorded_config(cfg: DictConfig, exp) -> DictConfig:
    """The command line's config with the stacker's recorded settings, after checking the rest agrees."""
    model_file = exp / "stack" / stacking.MODEL_FILE
    if not artifacts.read_state(exp / "stack") or not model_file.exists():
        raise UserError(f"{exp / 'stack'} holds no finished stacker; run stage=stack (or stage=all) first")
    saved = artifacts.read_json(model_file)
    differ = differing_keys(saved["setup"], setups.stack_setup(cfg))
    if differ:
        raise UserError(f"this command line differs from the settings the stacker of {exp} was trained with: "
                        f"{', '.join(differ)}; drop those overrides (or re-run stage=all)")
    cfg = OmegaConf.merge(cfg, {"stack": saved["stack"]})
    return cfg


def run(cfg: DictConfig) -> dict:
    exp = artifacts.exp_dir(cfg)
    test = inputs.load_test(cfg)
    if test is None:
        raise UserError("stage=predict needs a test file: add data.test=PATH")
    cfg = recorded_config(cfg, exp)
    test_path = inputs.data_paths(cfg)[1]
    if artifacts.is_main_process():
        extraction.ensure_test_features(cfg, exp, test, test_path)
    else:
        return {}
    result = stacking.score(cfg, with_test=True, baselines=False)
    submission = exp / stacking.SUBMISSION
    stacking.write_submission(submission, result["_test_ids"], result["_test"])
    artifacts.write_manifest(exp, cfg, "predict")
    metrics = {"n_rows": int(len(test.frame)), "test": str(test_path), "submission": str(submission),
               "n_repaired": test.n_repaired}
    artifacts.update_metrics(exp, "predict", metrics)
    print(f"predict: {metrics['n_rows']} rows scored -> {submission}")
    return metrics
