"""What stage two keeps and reads back: each outer fold's model as pickle-free files (and the record that rebuilds
it), the recorded stack settings with the trust check of every class they name, and the submission file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.decomposition import PCA

from pipeline import artifacts, layout, setups
from pipeline.data import LABEL_COLUMNS
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.stage_two import pooling
from pipeline.stage_two.design import design, head_prediction
from pipeline.stage_two.features import PairInputs
from pipeline.stage_two.members import Member, MemberFit, load_npz, save_npz

# Libraries whose classifiers a recorded stacker may name without the command line naming them too.
TRUSTED_PACKAGES = ("sklearn", "lightgbm")


def config_targets(tree) -> list[str]:
    """Every `_target_` in a nested config (DictConfig or plain data)."""
    if isinstance(tree, DictConfig):
        tree = OmegaConf.to_container(tree, resolve=True)
    if isinstance(tree, dict):
        own = [str(tree["_target_"])] if "_target_" in tree else []
        return own + [t for value in tree.values() for t in config_targets(value)]
    if isinstance(tree, list):
        return [t for value in tree for t in config_targets(value)]
    return []


def _hydra_keys(tree) -> list[str]:
    if isinstance(tree, dict):
        return [k for k in tree if str(k).startswith("_") and k != "_target_"] + \
            [k for value in tree.values() for k in _hydra_keys(value)]
    if isinstance(tree, list):
        return [k for value in tree for k in _hydra_keys(value)]
    return []


def is_trusted_classifier(target: str) -> bool:
    """A scikit-learn-compatible classifier class of a trusted package (importing a module of sklearn or lightgbm
    runs no code from the experiment folder)."""
    import importlib

    from sklearn.base import ClassifierMixin

    module_name, _, name = target.rpartition(".")
    if module_name.split(".")[0] not in TRUSTED_PACKAGES or name.startswith("_"):
        return False
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, ClassifierMixin)


def check_recorded_targets(recorded: dict, current: DictConfig, source: Path) -> None:
    """Stage two's settings read back from an experiment folder name no code to run: each `_target_` is a
    classifier of a trusted package or one the current config names itself, and no other Hydra key (`_args_`,
    `_partial_`, ...) appears."""
    allowed = set(config_targets(current))
    bad = [t for t in config_targets(recorded) if t not in allowed and not is_trusted_classifier(t)]
    if bad:
        raise UserError(f"{source} names {bad[0]} as a stage-two estimator, which is neither a scikit-learn / "
                        "LightGBM classifier nor in this command line's stack settings; the pipeline never runs "
                        "code named by an experiment folder (name the class in stack.members on the command line "
                        "if you trust it)")
    special = _hydra_keys(recorded)
    if special:
        raise UserError(f"{source} holds {special[0]}, which the pipeline's stack settings never record; re-run "
                        "stage=stack to rewrite it")


def with_recorded_stack(cfg: DictConfig, lay: Layout, trusted: DictConfig) -> DictConfig:
    """`cfg` with the stack settings the experiment's stacker was trained with (stack/model.json), after checking
    that the rest of `cfg` agrees with what it recorded (model, embed, cv, seed, train file: a differing key is an
    error naming it) and that the recorded settings name no code beyond what `trusted` (a stack config the user
    gave, or nothing) names (check_recorded_targets)."""
    model_file = lay.stack / layout.MODEL_FILE
    if not artifacts.read_state(lay.stack) or not model_file.exists():
        raise UserError(f"{lay.stack} holds no finished stacker; run stage=stack (or stage=all) first")
    try:
        saved = artifacts.read_json(model_file)
        recorded_setup, recorded_stack = saved["setup"], saved["stack"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{model_file} is damaged; re-run stage=stack") from None
    differ = [key for key, _, _ in artifacts.differing_values(recorded_setup, setups.stack_setup(cfg))]
    if differ:
        raise UserError(f"this command line differs from the settings the stacker of {lay.root} was trained with: "
                        f"{', '.join(differ)}; drop those overrides (or re-run stage=all)")
    check_recorded_targets(recorded_stack, trusted, model_file)
    # Settings added after the stacker was made take the values it was made with (setups.ADDED_LATER).
    recorded = setups.with_added_settings(OmegaConf.create({"stack": recorded_stack}))
    merged = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(cfg)), recorded)  # recorded keys may be new
    OmegaConf.set_struct(merged, True)
    return merged


@dataclass
class FoldModel:
    """What one outer fold's stage two learned, enough to score new rows: the vector reducers, each member's fitted
    model, the blend and the candidate chosen on the inner split (exported by stage=export, rebuilt by Predictor)."""

    members: list[Member]
    reducers: dict[str, PCA]
    fits: dict[str, MemberFit]
    blend: pooling.Pool
    chosen: str
    temperatures: dict[str, float]   # each member's calibration (1.0: none)

    def member_predictions(self, pair: PairInputs, vectors: dict, symmetric: bool) -> dict[str, np.ndarray]:
        head = head_prediction(pair)
        return {m.name: pooling.temper(m.predict(self.fits[m.name], design(pair, m.groups, vectors, self.reducers)
                                                 if m.reads_design else None, head, symmetric),
                                       self.temperatures.get(m.name, 1.0)) for m in self.members}

    def predict(self, pair: PairInputs, vectors: dict, symmetric: bool) -> np.ndarray:
        return self.combine(self.member_predictions(pair, vectors, symmetric))

    def combine(self, member_probs: dict[str, np.ndarray]) -> np.ndarray:
        if self.chosen == "blend":
            return self.blend.predict([member_probs[m.name] for m in self.members])
        return member_probs[self.chosen]


def save_fold_model(model: FoldModel, folder: Path, length_member: str, strict: bool = True) -> dict:
    """Write a fold's stage two as files (PCA components and means as npz, each member's export, never a pickle)
    and return the record that, with them, rebuilds it (`load_fold_model`). Member files are named
    `{prefix}_{member}`, the `length` baseline member's `{prefix}` alone (its booster: the documented
    `booster.txt`). With `strict` (an export) a member whose model has no pickle-free form is refused; without
    (stack/fold_k/, informational) its files are recorded as None."""
    folder.mkdir(parents=True, exist_ok=True)
    if model.reducers:
        save_npz(folder / "pca.npz", {f"{block}|{part}": getattr(pca, part) for block, pca in model.reducers.items()
                                      for part in ("components_", "mean_", "explained_variance_")})
    members = {}
    for member in model.members:
        stem = member.artifact_prefix if member.name == length_member else f"{member.artifact_prefix}_{member.name}"
        files = member.export(model.fits[member.name], folder, stem)
        if files is None and strict:
            raise UserError(f"stack member {member.name} ({member.describe()}) has no pickle-free form, so it "
                            "cannot be exported; use LightGBM or linear members (or score with the experiment "
                            "folder itself)")
        members[member.name] = {"params": model.fits[member.name].params, "files": files}
    return {"chosen": model.chosen, "blend": model.blend.record([m.name for m in model.members]),
            "temperatures": dict(model.temperatures), "reducers": sorted(model.reducers), "members": members}


def load_fold_model(record: dict, folder: Path, members: list[Member]) -> FoldModel:
    """Inverse of `save_fold_model`: the same predictions, bit for bit."""
    reducers = {}
    if record["reducers"]:
        arrays = load_npz(folder / "pca.npz")
        for block in record["reducers"]:
            components = arrays[f"{block}|components_"]
            pca = PCA(n_components=components.shape[0])
            pca.components_, pca.mean_ = components, arrays[f"{block}|mean_"]
            pca.explained_variance_ = arrays[f"{block}|explained_variance_"]
            pca.n_components_, pca.n_features_in_ = components.shape
            reducers[block] = pca
    fits = {m.name: MemberFit(np.zeros((0, 3)), float("nan"), record["members"][m.name]["params"],
                              m.restore(folder, record["members"][m.name]["files"])) for m in members}
    return FoldModel(members, reducers, fits, pooling.pool_from_record(record["blend"]), record["chosen"],
                     {name: float(t) for name, t in record.get("temperatures", {}).items()})


def submission_probabilities(probs: np.ndarray) -> np.ndarray:
    """What a submission holds: each probability at least 1e-7, each row summing to 1."""
    probs = np.clip(probs, 1e-7, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray) -> None:
    """Kaggle submission: id + three probabilities, rows in test order, each row summing to 1."""
    probs = submission_probabilities(probs)
    with artifacts.atomic_path(path) as tmp:
        pd.DataFrame({"id": ids, **dict(zip(LABEL_COLUMNS, probs.T))}).to_csv(tmp, index=False)
