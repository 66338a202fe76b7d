"""Stage two: per-group member models, a small blender, and the choice between them, all cross-validated honestly.

For each outer fold k (the experiment's folds), on the rows of the other folds only:
1. vector reductions (PCA per block) are fitted on those rows' vectors (no labels);
2. each member model (a feature group + any scikit-learn-compatible classifier named by `_target_`) picks its
   hyper-parameters (e.g. LightGBM's number of rounds, the logistic regression's C) on a prompt-grouped inner
   split of those rows, then is refitted on all of them;
3. the members are pooled (`stack.pooling`: by default the log-linear blend; `linear` and `geometric` bound the
   damage a member can do, optionally after a temperature per member fitted on its inner OOF, `stack.calibrate`),
   with weights fitted for the mean inner loss and, with `blend_robust`, the worst inner split's;
4. per fold the best single member replaces the pool where an inner split prefers it by more than
   `fallback_margin` (when set), and with `select`, where it beats the pool by more than `select_z` standard errors of the
   paired per-row log-loss difference (see pipeline/pooling.py).
Nothing fitted or chosen ever sees fold k's labels, so the OOF numbers are what new prompts would get. Every model
is A/B symmetric: trained on both orientations (labels swapped) and averaged with its mirrored prediction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedGroupKFold

from pipeline import artifacts, extraction, layout, pooling, setups
from pipeline.context import RunContext
from pipeline.data import LABEL_COLUMNS
from pipeline.errors import UserError, require_int, require_number
from pipeline.layout import Layout
from pipeline.features import (BASE_PREFIX, LM_LAYER, ORIENTATIONS, VECTOR_BLOCKS, PairInputs, VectorKey,
                               feature_frame, likelihood_frame, similarity_frame, text_inputs, vector_blocks)
from pipeline.members import GROUPS, Design, Member, MemberFit, member_from_config
from pipeline.scoring import accuracy, fold_prior, logloss

log = logging.getLogger(__name__)
EPS = 1e-7
BASELINE_MEMBERS = ("length", "linear")  # baselines fitted as members; stack.baselines says which member each is


# ----------------------------------------------------------------------------------------------------- inputs
def stacker_inputs(frame: pd.DataFrame, matrices: dict[str, np.ndarray]) -> PairInputs:
    """Everything the members may read, for the rows of `frame`, from the embed stage's feature table."""
    vectors = {name: m for name, m in matrices.items() if not name.startswith("head")}
    return replace(text_inputs(frame), head=matrices["head"], head_other=matrices["head_swapped"], vectors=vectors)


def available_layers(matrices: dict[str, np.ndarray], base: bool = False) -> list[str]:
    """The layers whose vectors a feature table holds (the base model's with `base`)."""
    keys = [VectorKey.parse(name) for name in matrices if VectorKey.is_vector(name)]
    return sorted({key.layer for key in keys if key.base == base and key.layer != LM_LAYER})


@dataclass(frozen=True)
class VectorRequest:
    """What `stack.vectors` asks of the embed features: whose vectors, which layers, blocks and orientations."""

    source: str                 # finetuned | base
    layers: list[str] | None    # None: every captured layer
    kinds: list[str]
    orientations: list[str]
    pca_components: int

    def settings(self, matrices: dict[str, np.ndarray]) -> dict:
        """The layers, blocks and orientations that feed the vector groups, checked against what embed made."""
        base = self.source == "base"
        present = available_layers(matrices, base)
        if not present:
            hint = "; run the embed stage with embed.base_vectors=true" if base else ""
            raise UserError(f"the embed features hold no {self.source} vectors{hint}")
        layers = present if self.layers is None else list(self.layers)
        missing = [layer for layer in layers if layer not in present]
        if missing:
            raise UserError(f"stack.vectors.layers={layers}: {missing} not in the embed features (have {present}); "
                            "re-run stage=embed with those embed.layers")
        prefix = BASE_PREFIX if base else ""
        swapped = str(VectorKey(layers[0], "verdict", "swp", base)) in matrices
        if "verdict_diff" in self.kinds and not swapped:
            raise UserError(f"stack.vectors.kinds={list(self.kinds)}: verdict_diff compares the verdict vectors of the "
                            "two A/B orientations, and these embed features have one (embed.swap_tta=false); drop "
                            "it (e.g. stack.vectors.kinds=[diff]) or re-run stage=embed with embed.swap_tta=true")
        return {"layers": layers, "kinds": list(self.kinds), "orientations": list(self.orientations),
                "prefix": prefix}


@dataclass
class StackSpec:
    """Stage two's settings as one typed object, built and checked once from `stack` (every member's estimator
    instantiated, so a bad `_target_` or grid fails at validation, before any model loads)."""

    seed: int
    inner_folds: int
    symmetric: bool
    select: bool
    select_z: float
    blend_l2: float
    pooling: pooling.PoolSettings    # how the members are combined (pipeline/pooling.py)
    calibrate: bool                  # a temperature per member, fitted on its inner OOF
    fallback_margin: float | None    # the best member replaces the blend where an inner split prefers it by more
    vectors: VectorRequest
    members: list[Member]            # blended, in stack.blend_members order
    baselines: dict[str, Member]     # length, linear: the members stack.baselines names

    @classmethod
    def from_config(cls, stack: DictConfig, seed: int) -> "StackSpec":
        v = stack.vectors
        bad = [k for k in v.kinds if k not in VECTOR_BLOCKS]
        if bad:
            raise UserError(f"stack.vectors.kinds: unknown {bad}; choose from {', '.join(VECTOR_BLOCKS)}")
        bad = [o for o in v.orientations if o not in ORIENTATIONS]
        if bad or not v.orientations:
            raise UserError(f"stack.vectors.orientations={list(v.orientations)}: use fwd and/or swp")
        if v.source not in ("finetuned", "base"):
            raise UserError(f"stack.vectors.source={v.source}: use finetuned or base")
        vectors = VectorRequest(str(v.source), None if v.layers in (None, "all") else list(v.layers), list(v.kinds),
                                list(v.orientations), require_int(v.pca_components, "stack.vectors.pca_components", 0))
        if not stack.blend_members:
            raise UserError("stack.blend_members is empty: name at least one of stack.members")
        named = {"stack.blend_members": list(stack.blend_members),
                 "stack.baselines": [stack.baselines.get(k) for k in BASELINE_MEMBERS]}
        for key, names in named.items():
            missing = [n for n in names if n not in stack.members]
            if missing:
                raise UserError(f"{key} names {missing}, which stack.members does not define "
                                f"(have {', '.join(stack.members)}); stack.baselines needs "
                                f"{', '.join(BASELINE_MEMBERS)}")
        members = {n: member_from_config(n, stack.members[n]) for n in {*named["stack.blend_members"],
                                                                        *named["stack.baselines"]}}
        if stack.pooling not in pooling.POOLINGS:
            raise UserError(f"stack.pooling={stack.pooling}: use {' or '.join(pooling.POOLINGS)}")
        l2 = require_number(stack.blend_l2, "stack.blend_l2", 0.0)
        pool = pooling.PoolSettings(str(stack.pooling), l2, require_number(stack.blend_robust, "stack.blend_robust",
                                                                            0.0, 1.0 + 1e-12))
        if not isinstance(stack.calibrate, bool):
            raise UserError(f"stack.calibrate={stack.calibrate}: use true or false")
        margin = None if stack.fallback_margin is None else \
            require_number(stack.fallback_margin, "stack.fallback_margin", 0.0)
        return cls(int(require_int(seed, "seed", 0)), require_int(stack.inner_folds, "stack.inner_folds", 2),
                   bool(stack.symmetric), bool(stack.select), require_number(stack.select_z, "stack.select_z", 0.0),
                   l2, pool, stack.calibrate, margin, vectors,
                   [members[n] for n in stack.blend_members],
                   {k: members[stack.baselines[k]] for k in BASELINE_MEMBERS})


# --------------------------------------------------------------------------------------------------- designs
def _head_frame(pair: PairInputs) -> pd.DataFrame:
    both = (pair.head + pair.head_other) / 2
    columns = {}
    for j, name in enumerate(("a", "b", "tie")):
        columns[f"head_log_{name}"] = np.log(np.clip(pair.head[:, j], EPS, 1))
        columns[f"head_other_log_{name}"] = np.log(np.clip(pair.head_other[:, j], EPS, 1))
        columns[f"head_mean_log_{name}"] = np.log(np.clip(both[:, j], EPS, 1))
    return pd.DataFrame(columns)


def group_frame(pair: PairInputs, group: str, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
    """One feature group's columns (pure given fitted reducers)."""
    if group == "text":
        return feature_frame(PairInputs(stats_a=pair.stats_a, stats_b=pair.stats_b, prompt_chars=pair.prompt_chars))
    if group == "rules":
        return feature_frame(PairInputs(rules=pair.rules))
    if group == "head":
        return _head_frame(pair)
    if group == "summary":
        return similarity_frame(pair.vectors, vectors["layers"], vectors["orientations"], vectors["prefix"])
    if group == "likelihood":
        try:
            return likelihood_frame(pair.vectors, vectors["orientations"], vectors["prefix"])
        except KeyError:
            raise UserError("the stack group `likelihood` reads the LM's span likelihoods (of the model "
                            "stack.vectors.source names), which the embed features lack; run stage=embed with "
                            "embed.lm_features=true") from None
    if group == "vectors":
        blocks = vector_blocks(pair.vectors, vectors["layers"], vectors["kinds"], vectors["orientations"],
                               vectors["prefix"])
        parts = []
        for name, block in blocks.items():
            reduced = reducers[name].transform(block) if name in reducers else block
            parts.append(pd.DataFrame(reduced, columns=[f"{name}_{j}" for j in range(reduced.shape[1])]))
        return pd.concat(parts, axis=1)
    raise UserError(f"unknown stack feature group {group!r}; choose from {', '.join(GROUPS)}")


def fit_reducers(pair: PairInputs, index: np.ndarray, vectors: dict, n_components: int, seed: int) -> dict[str, PCA]:
    """PCA per vector block, fitted on the training rows in both orientations (so a reduced diff still changes
    sign under a swap). Unsupervised: it never reads a label."""
    if n_components <= 0:
        return {}
    rows = lambda p: replace(p, vectors={k: v[index] for k, v in p.vectors.items()})  # noqa: E731
    original = vector_blocks(rows(pair).vectors, vectors["layers"], vectors["kinds"], vectors["orientations"],
                             vectors["prefix"])
    mirrored = vector_blocks(rows(pair.swapped()).vectors, vectors["layers"], vectors["kinds"],
                             vectors["orientations"], vectors["prefix"])
    reducers = {}
    for name, block in original.items():
        both = np.concatenate([block, mirrored[name]])
        pca = PCA(n_components=min(n_components, *both.shape), random_state=seed).fit(both)
        # C-ordered components: an export stores them so, and a matmul's last bit depends on the memory layout
        # (the solver can return a reversed view), so the model that scores here is the one an export rebuilds.
        pca.components_ = np.ascontiguousarray(pca.components_)
        reducers[name] = pca
    return reducers


def design(pair: PairInputs, groups: list[str], vectors: dict, reducers: dict[str, PCA]) -> Design:
    def build(p: PairInputs) -> pd.DataFrame:
        return pd.concat([group_frame(p, g, vectors, reducers) for g in groups], axis=1)

    original = build(pair)
    return Design(original.to_numpy(np.float64), build(pair.swapped()).to_numpy(np.float64), list(original.columns))


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


def head_prediction(pair: PairInputs) -> np.ndarray:
    return (pair.head + pair.head_other) / 2


# ---------------------------------------------------------------------------------------------------- selection
def select_candidate(y: np.ndarray, blend_oof: np.ndarray, member_oof: dict[str, np.ndarray], z: float) -> str:
    """The blend, unless a single member beats it on the inner split by more than z standard errors of the
    paired per-row log-loss difference: candidates this close are told apart by noise, and the blend already
    contains each member."""
    blend_rows = pooling.row_losses(y, blend_oof)
    best, best_gain = "blend", 0.0
    for name, probs in member_oof.items():
        diff = blend_rows - pooling.row_losses(y, probs)
        gain, se = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
        if gain > z * se and gain > best_gain:
            best, best_gain = name, gain
    return best


# ------------------------------------------------------------------------------------------------ cross-fitting
def inner_splits(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group-aware inner folds of a training set (as many as it has groups, at most n_splits)."""
    n_splits = min(n_splits, len(np.unique(groups)))
    if n_splits < 2:
        raise UserError("a training set holds a single group, so nothing can be chosen on an inner split; "
                        "use more folds or another cv.group_by")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y, groups)]


def check_inner_splits(labels: np.ndarray, groups: np.ndarray, fold_of: np.ndarray, inner_folds: int,
                       seed: int) -> None:
    """Refuse, before any fine-tune, folds whose training sets stage two cannot split into inner folds (e.g.
    cv.group_by=source with one source holding most rows)."""
    for k in np.unique(fold_of):
        train = fold_of != k
        try:
            inner_splits(labels[train], groups[train], inner_folds, seed)
        except (UserError, ValueError) as exc:
            raise UserError(f"stage two cannot choose anything for fold {int(k)}: its training set "
                            f"({int(train.sum())} rows, {len(np.unique(groups[train]))} groups) cannot be split "
                            f"into stack.inner_folds={inner_folds} inner folds ({exc}); lower stack.inner_folds, raise "
                            "cv.n_folds or use another cv.group_by") from None


@dataclass
class StackData:
    """What stage two is fitted on: the inputs of every train row, labels, the experiment's folds, the group of
    each row (inner splits keep groups together), the vector settings, and optionally the test rows' inputs."""

    pair: PairInputs
    labels: np.ndarray
    fold_of: np.ndarray
    groups: np.ndarray
    vectors: dict
    test: PairInputs | None = None
    group_by: str = "prompt"


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
    from pipeline.members import save_npz

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
    from pipeline.members import load_npz

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


@dataclass
class FoldResult:
    probs: np.ndarray                 # the chosen candidate's predictions on the scored rows
    test_probs: np.ndarray | None
    chosen: str
    reason: str                       # why `chosen` scored this fold
    inner_losses: dict[str, float]
    blend: dict
    member_probs: dict[str, np.ndarray]
    member_test: dict[str, np.ndarray]
    model: FoldModel

    @property
    def fits(self) -> dict[str, MemberFit]:
        return self.model.fits


def fit_fold(data: StackData, spec: StackSpec, members: list[Member], k: int) -> FoldResult:
    """Stage two for outer fold k: fit on the other folds' rows only, predict fold k's rows (and the test rows)."""
    pair, y, test = data.pair, data.labels, data.test
    train, valid = np.flatnonzero(data.fold_of != k), np.flatnonzero(data.fold_of == k)
    uses_vectors = any(g == "vectors" for m in members for g in m.groups)
    reducers = fit_reducers(pair, train, data.vectors, spec.vectors.pca_components, spec.seed) if uses_vectors \
        else {}
    inner = inner_splits(y[train], data.groups[train], spec.inner_folds, spec.seed)
    head_all = head_prediction(pair)
    fits, member_probs, temperatures, inner_oof = {}, {}, {}, {}
    for member in members:
        x = design(pair, member.groups, data.vectors, reducers) if member.reads_design else None
        fit = member.fit(None if x is None else x.rows(train), y[train], inner, head_all[train], spec.symmetric,
                         spec.seed)
        fits[member.name] = fit
        # Calibrated on the member's inner OOF (training rows only): no member more confident than it earned there.
        temperatures[member.name] = pooling.fit_temperature(fit.inner_oof, y[train]) if spec.calibrate else 1.0
        inner_oof[member.name] = pooling.temper(fit.inner_oof, temperatures[member.name])
        member_probs[member.name] = pooling.temper(member.predict(fit, None if x is None else x.rows(valid),
                                                                  head_all[valid], spec.symmetric),
                                                   temperatures[member.name])
    names = [m.name for m in members]
    groups = [va for _, va in inner]
    blend = pooling.fit_pool(spec.pooling, [inner_oof[n] for n in names], y[train], groups)
    inner_losses = {n: logloss(y[train], inner_oof[n]) for n in names}
    chosen, reason = names[0], "the only member"
    if len(names) > 1:
        blend_oof = pooling.pool_inner_oof(spec.pooling, [inner_oof[n] for n in names], y[train], inner)
        inner_losses["blend"] = logloss(y[train], blend_oof)
        chosen, reason = choose(y[train], blend_oof, inner_oof, inner, spec)
    model = FoldModel(members, reducers, fits, blend, chosen, temperatures)
    # New rows (the test file) go through the same FoldModel an export rebuilds.
    member_test = model.member_predictions(test, data.vectors, spec.symmetric) if test is not None else {}
    weights = dict(zip(names, np.round(blend.weights, 4).tolist()))
    summary = {"kind": blend.kind, "weights": weights, "temperatures": {n: round(t, 4) for n, t in temperatures.items()}}
    summary.update({"tie_bias": round(blend.tie_bias, 4)} if isinstance(blend, pooling.LogLinearPool) else
                   {"prior_weight": round(blend.prior_weight, 4)})
    return FoldResult(model.combine(member_probs), model.combine(member_test) if test is not None else None, chosen,
                      reason, inner_losses, summary, member_probs, member_test, model)


def choose(y: np.ndarray, blend_oof: np.ndarray, member_oof: dict[str, np.ndarray],
           inner: list[tuple[np.ndarray, np.ndarray]], spec: StackSpec) -> tuple[str, str]:
    """The candidate that scores an outer fold, and why: the best single member where the inner splits disagree
    about the blend (pooling.fallback), else with `select` a member that beats the blend by select_z standard
    errors, else the blend."""
    fell_back = pooling.fallback(y, blend_oof, member_oof, inner, spec.fallback_margin, spec.select_z)
    if fell_back is not None:
        return fell_back.member, fell_back.reason()
    if spec.select:
        best = select_candidate(y, blend_oof, member_oof, spec.select_z)
        if best != "blend":
            return best, f"{best} beat the blend on the inner split by more than {spec.select_z:g} standard errors"
    return "blend", "the blend: no member beat it on the inner split"


@dataclass
class CVResult:
    oof: np.ndarray
    test: np.ndarray | None
    member_oof: dict[str, np.ndarray]
    folds: list[FoldResult] = field(default_factory=list)


def cross_validate(data: StackData, spec: StackSpec, members: list[Member]) -> CVResult:
    """Outer K-fold over the experiment's folds; see the module docstring."""
    y, fold_of = data.labels, data.fold_of
    oof = np.zeros((len(y), 3))
    member_oof = {m.name: np.zeros((len(y), 3)) for m in members}
    test_parts, results = [], []
    for k in range(int(fold_of.max()) + 1):
        result = fit_fold(data, spec, members, k)
        valid = fold_of == k
        oof[valid] = result.probs
        for name, probs in result.member_probs.items():
            member_oof[name][valid] = probs
        if data.test is not None:
            test_parts.append(result.test_probs)
        results.append(result)
        log.info("stack fold %d: chose %s (inner %s)", k, result.chosen,
                 {n: round(v, 4) for n, v in result.inner_losses.items()})
    return CVResult(oof, np.mean(test_parts, axis=0) if test_parts else None, member_oof, results)


def load_train_features(ctx: RunContext, finetune_state: dict) -> dict[str, np.ndarray]:
    """OOF embed features in data order, after the checks that they are leak-free and made with this setup (that
    of the adapters whose checked state is `finetune_state`: extraction.finetune_fold_states)."""
    lay = ctx.layout
    path, manifest_path = lay.train_features, lay.embed_manifest
    if not path.exists() or not manifest_path.exists():
        raise UserError(f"{path} not found; run stage=embed first")
    manifest = artifacts.read_json(manifest_path)
    expected = setups.embed_setup(ctx.cfg, finetune_state)
    changed = [k for k, v in expected.items() if manifest.get("setup", {}).get(k) != v]
    if changed:
        raise UserError(f"{path} was made with other settings ({', '.join(changed)} differ from this command "
                        "line's); run stage=embed with these settings first")
    table = artifacts.read_feature_table(path)  # read once: it can be the experiment's largest file
    matrices = extraction.rows_in_order(table, ctx.ids, path)
    scalars = table.scalars
    assigned = dict(zip(ctx.ids, ctx.fold_of.astype(int)))
    leaks = extraction.leaking_rows(scalars["id"].astype(str).to_numpy(), scalars["fold"].to_numpy(), assigned,
                                    manifest)
    if leaks:
        raise UserError(f"{path}: {len(leaks)} rows (first id {leaks[0]}) were scored by an adapter trained on them "
                        "or on another fold layout; delete the embed folder and re-run stage=embed")
    return matrices


def test_features(ctx: RunContext, finetune_state: dict) -> dict[str, np.ndarray]:
    """The test file's features, made by finetune/embed/predict with the current setup (never extracted here)."""
    folder = extraction.test_folder(ctx, finetune_state)
    path = folder / layout.TEST_FEATURES
    if not path.exists():
        raise UserError(f"no features for data.test={ctx.test_path} with this setup; run stage=embed (or "
                        "stage=predict) with it first")
    return extraction.read_in_order(path, ctx.test.frame["id"].to_numpy())


@dataclass
class StackResult:
    """Stage two's results on an experiment's folds: the stacker's OOF (and test) predictions, each member's OOF,
    the baselines' OOF on the same folds, and per fold what was chosen and fitted."""

    spec: StackSpec
    data: StackData
    cv: CVResult
    baselines: dict[str, np.ndarray] | None  # prior, length, head, linear; None when not computed

    @property
    def oof(self) -> np.ndarray:
        return self.cv.oof

    @property
    def test(self) -> np.ndarray | None:
        return self.cv.test

    @property
    def folds(self) -> list[FoldResult]:
        return self.cv.folds

    def per_fold(self, probs: np.ndarray) -> list[float]:
        labels, fold_of = self.data.labels, self.data.fold_of
        return [logloss(labels[fold_of == k], probs[fold_of == k]) for k in range(int(fold_of.max()) + 1)]

    def metrics(self) -> dict:
        """metrics.json's `stack` entry (README: the public contract)."""
        labels, folds = self.data.labels, self.folds
        metrics = {"oof_logloss": logloss(labels, self.oof), "accuracy": accuracy(labels, self.oof),
                   "chosen": [f.chosen for f in folds], "chosen_reason": [f.reason for f in folds]}
        if self.baselines is None:
            return metrics
        members = self.spec.members
        metrics.update({
            "per_fold": self.per_fold(self.oof),
            "inner_losses": [{n: round(v, 4) for n, v in f.inner_losses.items()} for f in folds],
            "blend": [f.blend for f in folds],
            "params": [{name: fit.params for name, fit in f.fits.items()} for f in folds],
            "members": {name: logloss(labels, probs) for name, probs in self.cv.member_oof.items()},
            "baselines": {name: logloss(labels, probs) for name, probs in self.baselines.items()},
            "baseline_accuracy": {name: accuracy(labels, probs) for name, probs in self.baselines.items()},
            "baseline_per_fold": {name: self.per_fold(probs) for name, probs in self.baselines.items()},
            "features": {"blend_members": [m.name for m in members], "groups": {m.name: m.groups for m in members},
                         "estimators": {m.name: m.describe() for m in members},
                         "vectors": dict(self.data.vectors), "pca_components": self.spec.vectors.pca_components,
                         "cv_group_by": self.data.group_by},
        })
        metrics["gain_over_best_baseline"] = min(metrics["baselines"][k] for k in ("prior", "length", "head")) - \
            metrics["oof_logloss"]
        return metrics

    def plots(self) -> dict[str, np.ndarray]:
        """The OOF predictions the report's reliability diagram shows."""
        return {"stacker": self.oof, **{k: self.baselines[k] for k in ("head", "length", "linear")}}


def evaluate(data: StackData, spec: StackSpec, baselines: bool = True) -> StackResult:
    """Stage two and, with `baselines`, the baselines on the same folds: the class prior, the head alone, and the
    members the spec names as `length` and `linear` (each cross-validated alone unless it is blended anyway)."""
    stacker = cross_validate(data, spec, spec.members)
    if not baselines:
        return StackResult(spec, data, stacker, None)
    reference = {"prior": fold_prior(data.labels, data.fold_of)}
    for name, member in spec.baselines.items():
        reference[name] = stacker.member_oof[member.name] if member.name in stacker.member_oof else \
            cross_validate(data, spec, [member]).oof
    reference = {"prior": reference["prior"], "length": reference["length"], "head": head_prediction(data.pair),
                 "linear": reference["linear"]}
    return StackResult(spec, data, stacker, reference)


def score(ctx: RunContext, spec: StackSpec, with_test: bool = False, baselines: bool = True) -> StackResult:
    """Cross-validate stage two (and the baselines) on an experiment's features. Deterministic for a given spec:
    stage=predict refits with the recorded one."""
    finetune_state = extraction.finetune_fold_states(ctx)[0]  # every fold checked once
    matrices = load_train_features(ctx, finetune_state)
    test = stacker_inputs(ctx.test.frame, test_features(ctx, finetune_state)) \
        if with_test and ctx.test is not None else None
    data = StackData(stacker_inputs(ctx.train.frame, matrices), ctx.labels, ctx.fold_of, ctx.groups,
                     spec.vectors.settings(matrices), test, str(ctx.cfg.cv.group_by))
    return evaluate(data, spec, baselines)


def submission_probabilities(probs: np.ndarray) -> np.ndarray:
    """What a submission holds: each probability at least 1e-7, each row summing to 1."""
    probs = np.clip(probs, 1e-7, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray) -> None:
    """Kaggle submission: id + three probabilities, rows in test order, each row summing to 1."""
    probs = submission_probabilities(probs)
    with artifacts.atomic_path(path) as tmp:
        pd.DataFrame({"id": ids, **dict(zip(LABEL_COLUMNS, probs.T))}).to_csv(tmp, index=False)
