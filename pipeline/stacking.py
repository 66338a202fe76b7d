"""Stage two: per-group member models, a small blender, and the choice between them, all cross-validated honestly.

For each outer fold k (the experiment's folds), on the rows of the other folds only:
1. vector reductions (PCA per block) are fitted on those rows' vectors (no labels);
2. each member model (a feature group + any scikit-learn-compatible classifier named by `_target_`) picks its
   hyper-parameters (e.g. LightGBM's number of rounds, the logistic regression's C) on a prompt-grouped inner
   split of those rows, then is refitted on all of them;
3. a log-linear pool of the members' probabilities (one non-negative weight per member and a tie bias) is fitted
   on the members' inner out-of-fold predictions;
4. with `select`, a member alone (the head included) replaces the blend for fold k only when it beats the blend
   on the inner split by more than `select_z` standard errors of the paired per-row log-loss difference.
Nothing fitted or chosen ever sees fold k's labels, so the OOF numbers are what new prompts would get. Every model
is A/B symmetric: trained on both orientations (labels swapped) and averaged with its mirrored prediction.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from scipy.optimize import minimize
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import artifacts, extraction, layout, setups
from pipeline.context import RunContext
from pipeline.data import LABEL_COLUMNS, swap_label, swap_probabilities
from pipeline.errors import UserError
from pipeline.features import PairInputs, feature_frame, similarity_frame, text_inputs, vector_blocks
from pipeline.scoring import accuracy, fold_prior, logloss

log = logging.getLogger(__name__)
GROUPS = ("text", "rules", "head", "summary", "vectors")
EPS = 1e-7


# ----------------------------------------------------------------------------------------------------- inputs
def stacker_inputs(frame: pd.DataFrame, matrices: dict[str, np.ndarray]) -> PairInputs:
    """Everything the members may read, for the rows of `frame`, from the embed stage's feature table."""
    vectors = {name: m for name, m in matrices.items() if not name.startswith("head")}
    return replace(text_inputs(frame), head=matrices["head"], head_other=matrices["head_swapped"], vectors=vectors)


def available_layers(matrices: dict[str, np.ndarray], prefix: str = "") -> list[str]:
    return sorted({name[len(prefix):].split("_")[0] for name in matrices
                   if name.startswith(prefix) and not name.startswith("head") and
                   (prefix or not name.startswith("base_"))})


def vector_settings(stack_cfg: DictConfig, matrices: dict[str, np.ndarray]) -> dict:
    """Which layers, blocks and orientations feed the vector groups; checked against what embed produced."""
    v = stack_cfg.vectors
    prefix = "base_" if v.source == "base" else ""
    if v.source not in ("finetuned", "base"):
        raise UserError(f"stack.vectors.source={v.source}: use finetuned or base")
    present = available_layers(matrices, prefix)
    if not present:
        hint = "; run the embed stage with embed.base_vectors=true" if prefix else ""
        raise UserError(f"the embed features hold no {v.source} vectors{hint}")
    layers = present if v.layers in (None, "all") else list(v.layers)
    missing = [layer for layer in layers if layer not in present]
    if missing:
        raise UserError(f"stack.vectors.layers={layers}: {missing} not in the embed features (have {present}); "
                        "re-run stage=embed with those embed.layers")
    return {"layers": layers, "kinds": list(v.kinds), "orientations": list(v.orientations), "prefix": prefix}


# --------------------------------------------------------------------------------------------------- designs
@dataclass
class Design:
    """A member's feature matrix for some rows in both orientations (the mirror is the A/B-swapped pair)."""

    original: np.ndarray
    mirrored: np.ndarray
    columns: list[str]

    def rows(self, index: np.ndarray) -> "Design":
        return Design(self.original[index], self.mirrored[index], self.columns)


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
        reducers[name] = PCA(n_components=min(n_components, *both.shape), random_state=seed).fit(both)
    return reducers


def design(pair: PairInputs, groups: list[str], vectors: dict, reducers: dict[str, PCA]) -> Design:
    def build(p: PairInputs) -> pd.DataFrame:
        return pd.concat([group_frame(p, g, vectors, reducers) for g in groups], axis=1)

    original = build(pair)
    return Design(original.to_numpy(np.float64), build(pair.swapped()).to_numpy(np.float64), list(original.columns))


# --------------------------------------------------------------------------------------------------- members
@dataclass
class Member:
    """A level-1 model: a feature-group list and a classifier (None = the head's own probabilities)."""

    name: str
    groups: list[str]
    estimator: DictConfig | None
    search: dict[str, list]
    standardize: bool

    @classmethod
    def from_config(cls, name: str, node: DictConfig) -> "Member":
        groups = list(node.groups)
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise UserError(f"stack.members.{name}.groups: unknown {unknown}; choose from {', '.join(GROUPS)}")
        if node.estimator is None and groups != ["head"]:
            raise UserError(f"stack.members.{name}: estimator null (pass-through) works only for groups [head]")
        search = OmegaConf.to_container(node.search, resolve=True) if node.get("search") else {}
        return cls(name, groups, node.estimator, search, bool(node.get("standardize", False)))

    def grid(self) -> list[dict]:
        keys = list(self.search)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.search[k] for k in keys))] or [{}]

    def build(self, params: dict, seed: int):
        estimator = instantiate(self.estimator, _convert_="all")
        if "random_state" in estimator.get_params():
            estimator.set_params(random_state=seed)
        estimator = clone(estimator).set_params(**params)
        return make_pipeline(StandardScaler(), estimator) if self.standardize else estimator


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


def fit_symmetric(model, x: Design, y: np.ndarray, symmetric: bool):
    if symmetric:
        model.fit(np.concatenate([x.original, x.mirrored]), np.concatenate([y, [swap_label(v) for v in y]]))
    else:
        model.fit(x.original, y)
    return model


def predict_symmetric(model, x: Design, symmetric: bool, **predict_params) -> np.ndarray:
    probs = _three_columns(model, model.predict_proba(x.original, **predict_params))
    if symmetric:
        probs = (probs + swap_probabilities(_three_columns(model, model.predict_proba(x.mirrored,
                                                                                    **predict_params)))) / 2
    return probs


def _three_columns(model, probs: np.ndarray) -> np.ndarray:
    """predict_proba columns follow model.classes_; a training set missing a class still gives 3 columns."""
    out = np.zeros((len(probs), 3))
    out[:, np.asarray(model.classes_, dtype=int)] = probs
    return out


def head_prediction(pair: PairInputs) -> np.ndarray:
    return (pair.head + pair.head_other) / 2


@dataclass
class MemberFit:
    inner_oof: np.ndarray       # predictions for the training rows, each from a model that did not see it
    inner_loss: float
    params: dict
    model: object | None        # refitted on all training rows (None for the pass-through head)


def _inner_predictions(member: Member, x: Design, y: np.ndarray, inner: list[tuple[np.ndarray, np.ndarray]],
                       symmetric: bool, seed: int):
    """(params, inner OOF predictions) for every grid point. A LightGBM member searched over n_estimators alone is
    fitted once per inner split at the largest count and read at each count (the same trees, 1/len(grid) the
    work)."""
    staged = list(member.search) == ["n_estimators"] and \
        str(member.estimator.get("_target_", "")).endswith("LGBMClassifier")
    if not staged:
        for params in member.grid():
            oof = np.zeros((len(y), 3))
            for inner_train, inner_valid in inner:
                model = fit_symmetric(member.build(params, seed), x.rows(inner_train), y[inner_train], symmetric)
                oof[inner_valid] = predict_symmetric(model, x.rows(inner_valid), symmetric)
            yield params, oof
        return
    counts = sorted(member.search["n_estimators"])
    oofs = {n: np.zeros((len(y), 3)) for n in counts}
    for inner_train, inner_valid in inner:
        model = fit_symmetric(member.build({"n_estimators": counts[-1]}, seed), x.rows(inner_train),
                              y[inner_train], symmetric)
        for n in counts:
            oofs[n][inner_valid] = predict_symmetric(model, x.rows(inner_valid), symmetric, num_iteration=n)
    for n in counts:
        yield {"n_estimators": n}, oofs[n]


def fit_member(member: Member, x: Design | None, y: np.ndarray, inner: list[tuple[np.ndarray, np.ndarray]],
               head: np.ndarray, symmetric: bool, seed: int) -> MemberFit:
    """Choose the member's hyper-parameters on the inner split, then refit it on every training row."""
    if member.estimator is None:
        return MemberFit(head, logloss(y, head), {}, None)
    best: MemberFit | None = None
    for params, oof in _inner_predictions(member, x, y, inner, symmetric, seed):
        loss = logloss(y, oof)
        if best is None or loss < best.inner_loss:
            best = MemberFit(oof, loss, params, None)
    best.model = fit_symmetric(member.build(best.params, seed), x, y, symmetric)
    return best


# ---------------------------------------------------------------------------------------------------- blender
@dataclass
class Blend:
    """Log-linear pool: p proportional to exp(sum_m w_m log p_m + [0, 0, tie_bias]), w_m >= 0. A few parameters,
    A/B symmetric whenever the members are."""

    weights: np.ndarray
    tie_bias: float

    def predict(self, member_probs: list[np.ndarray]) -> np.ndarray:
        logits = sum(w * np.log(np.clip(p, EPS, 1)) for w, p in zip(self.weights, member_probs))
        logits = logits + np.array([0.0, 0.0, self.tie_bias])
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)


def fit_blend(member_probs: list[np.ndarray], y: np.ndarray, l2: float) -> Blend:
    def loss(theta: np.ndarray) -> float:
        blend = Blend(theta[:-1], theta[-1])
        return logloss(y, blend.predict(member_probs)) + l2 * float(np.sum(theta[:-1] ** 2))

    start = np.array([1.0 / len(member_probs)] * len(member_probs) + [0.0])
    bounds = [(0.0, 5.0)] * len(member_probs) + [(-5.0, 5.0)]
    result = minimize(loss, start, method="L-BFGS-B", bounds=bounds)
    return Blend(result.x[:-1], float(result.x[-1]))


def blend_inner_oof(member_probs: list[np.ndarray], y: np.ndarray, inner: list[tuple[np.ndarray, np.ndarray]],
                    l2: float) -> np.ndarray:
    """The blend's own inner-CV predictions: fitted on the other inner folds' member predictions."""
    oof = np.zeros((len(y), 3))
    for inner_train, inner_valid in inner:
        blend = fit_blend([p[inner_train] for p in member_probs], y[inner_train], l2)
        oof[inner_valid] = blend.predict([p[inner_valid] for p in member_probs])
    return oof


def row_losses(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1))


def select_candidate(y: np.ndarray, blend_oof: np.ndarray, member_oof: dict[str, np.ndarray], z: float) -> str:
    """The blend, unless a single member beats it on the inner split by more than z standard errors of the
    paired per-row log-loss difference: candidates this close are told apart by noise, and the blend already
    contains each member."""
    blend_rows = row_losses(y, blend_oof)
    best, best_gain = "blend", 0.0
    for name, probs in member_oof.items():
        diff = blend_rows - row_losses(y, probs)
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
class FoldResult:
    probs: np.ndarray                 # the chosen candidate's predictions on the scored rows
    test_probs: np.ndarray | None
    chosen: str
    inner_losses: dict[str, float]
    blend: dict
    member_probs: dict[str, np.ndarray]
    member_test: dict[str, np.ndarray]
    params: dict[str, dict]
    models: dict[str, object]


def fit_fold(pair: PairInputs, y: np.ndarray, train: np.ndarray, valid: np.ndarray, groups: np.ndarray,
             stack_cfg: DictConfig, members: list[Member], vectors: dict, seed: int,
             test: PairInputs | None = None) -> FoldResult:
    """Stage two for one outer fold: fit on `train` rows only, predict `valid` rows (and the test rows)."""
    uses_vectors = any(g == "vectors" for m in members for g in m.groups)
    reducers = fit_reducers(pair, train, vectors, int(stack_cfg.vectors.pca_components), seed) if uses_vectors \
        else {}
    inner = inner_splits(y[train], groups[train], int(stack_cfg.inner_folds), seed)
    head_all = head_prediction(pair)
    fits, member_probs, member_test, params, models = {}, {}, {}, {}, {}
    for member in members:
        x = design(pair, member.groups, vectors, reducers) if member.estimator is not None else None
        fit = fit_member(member, None if x is None else x.rows(train), y[train], inner, head_all[train],
                         bool(stack_cfg.symmetric), seed)
        fits[member.name], params[member.name], models[member.name] = fit, fit.params, fit.model
        if fit.model is None:
            member_probs[member.name] = head_all[valid]
            if test is not None:
                member_test[member.name] = head_prediction(test)
        else:
            member_probs[member.name] = predict_symmetric(fit.model, x.rows(valid), bool(stack_cfg.symmetric))
            if test is not None:
                member_test[member.name] = predict_symmetric(fit.model, design(test, member.groups, vectors, reducers),
                                                             bool(stack_cfg.symmetric))
    names = [m.name for m in members]
    l2 = float(stack_cfg.blend_l2)
    blend = fit_blend([fits[n].inner_oof for n in names], y[train], l2)
    inner_losses = {n: fits[n].inner_loss for n in names}
    if len(names) > 1:
        blend_oof = blend_inner_oof([fits[n].inner_oof for n in names], y[train], inner, l2)
        inner_losses["blend"] = logloss(y[train], blend_oof)
        chosen = select_candidate(y[train], blend_oof, {n: fits[n].inner_oof for n in names},
                                  float(stack_cfg.select_z)) if stack_cfg.select else "blend"
    else:
        chosen = names[0]
    if chosen == "blend":
        probs = blend.predict([member_probs[n] for n in names])
        test_probs = blend.predict([member_test[n] for n in names]) if test is not None else None
    else:
        probs, test_probs = member_probs[chosen], member_test.get(chosen)
    return FoldResult(probs, test_probs, chosen, inner_losses,
                      {"weights": dict(zip(names, np.round(blend.weights, 4).tolist())),
                       "tie_bias": round(blend.tie_bias, 4)},
                      member_probs, member_test, params, models)


@dataclass
class CVResult:
    oof: np.ndarray
    test: np.ndarray | None
    member_oof: dict[str, np.ndarray]
    folds: list[FoldResult] = field(default_factory=list)


def members_from_config(stack_cfg: DictConfig, names: list[str]) -> list[Member]:
    missing = [n for n in names if n not in stack_cfg.members]
    if missing:
        raise UserError(f"stack.blend_members names {missing}, which stack.members does not define "
                        f"(have {', '.join(stack_cfg.members)})")
    return [Member.from_config(n, stack_cfg.members[n]) for n in names]


def cross_validate(pair: PairInputs, y: np.ndarray, fold_of: np.ndarray, groups: np.ndarray, stack_cfg: DictConfig,
                   members: list[Member], vectors: dict, seed: int, test: PairInputs | None = None) -> CVResult:
    """Outer K-fold over the experiment's folds; see the module docstring."""
    n_folds = int(fold_of.max()) + 1
    oof = np.zeros((len(y), 3))
    member_oof = {m.name: np.zeros((len(y), 3)) for m in members}
    test_parts, results = [], []
    for k in range(n_folds):
        train, valid = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        result = fit_fold(pair, y, train, valid, groups, stack_cfg, members, vectors, seed, test)
        oof[valid] = result.probs
        for name, probs in result.member_probs.items():
            member_oof[name][valid] = probs
        if test is not None:
            test_parts.append(result.test_probs)
        results.append(result)
        log.info("stack fold %d: chose %s (inner %s)", k, result.chosen,
                 {n: round(v, 4) for n, v in result.inner_losses.items()})
    return CVResult(oof, np.mean(test_parts, axis=0) if test_parts else None, member_oof, results)


def load_train_features(ctx: RunContext) -> dict[str, np.ndarray]:
    """OOF embed features in data order, after the checks that they are leak-free and made with this setup."""
    lay = ctx.layout
    path, manifest_path = lay.train_features, lay.embed_manifest
    if not path.exists() or not manifest_path.exists():
        raise UserError(f"{path} not found; run stage=embed first")
    manifest = artifacts.read_json(manifest_path)
    expected = setups.embed_setup(ctx.cfg, extraction.finetune_fold_states(ctx)[0])
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


def test_features(ctx: RunContext) -> dict[str, np.ndarray]:
    """The test file's features, made by finetune/embed/predict with the current setup (never extracted here)."""
    folder = extraction.test_folder(ctx, extraction.finetune_fold_states(ctx)[0])
    path = folder / layout.TEST_FEATURES
    if not path.exists():
        raise UserError(f"no features for data.test={ctx.test_path} with this setup; run stage=embed (or "
                        "stage=predict) with it first")
    return extraction.read_in_order(path, ctx.test.frame["id"].to_numpy())


def score(ctx: RunContext, with_test: bool = False, baselines: bool = True) -> dict:
    """Cross-validate stage two (and the baselines) on an experiment's features; returns metrics plus the arrays
    the stack stage writes (keys `_...`). Deterministic for a given config: stage=predict refits with it."""
    frame = ctx.train.frame
    matrices = load_train_features(ctx)
    test = ctx.test if with_test else None
    test_pair = stacker_inputs(test.frame, test_features(ctx)) if test is not None else None
    metrics = evaluate(stacker_inputs(frame, matrices), ctx.labels, ctx.fold_of, ctx.groups, ctx.cfg,
                       vector_settings(ctx.cfg.stack, matrices), test_pair, baselines)
    metrics["_frame"] = frame
    metrics["_test_ids"] = None if test is None else test.frame["id"].to_numpy()
    return metrics


def evaluate(pair: PairInputs, labels: np.ndarray, fold_of: np.ndarray, groups: np.ndarray, cfg: DictConfig,
             vectors: dict, test_pair: PairInputs | None = None, baselines: bool = True) -> dict:
    """Stage two and the baselines (prior, length = the text member, head, linear) on the given folds."""
    seed = int(cfg.seed)
    n_folds = int(fold_of.max()) + 1
    names = list(cfg.stack.blend_members)
    stacker = cross_validate(pair, labels, fold_of, groups, cfg.stack, members_from_config(cfg.stack, names),
                             vectors, seed, test_pair)
    metrics = {"oof_logloss": logloss(labels, stacker.oof), "accuracy": accuracy(labels, stacker.oof),
               "chosen": [f.chosen for f in stacker.folds], "_oof": stacker.oof, "_test": stacker.test}
    if not baselines:
        return metrics
    member_oof = dict(stacker.member_oof)
    for baseline in ("text", "linear"):
        if baseline not in member_oof:
            member_oof[baseline] = cross_validate(pair, labels, fold_of, groups, cfg.stack,
                                                  members_from_config(cfg.stack, [baseline]), vectors, seed).oof
    head = head_prediction(pair)
    reference = {"prior": fold_prior(labels, fold_of), "length": member_oof["text"], "head": head,
                 "linear": member_oof["linear"]}

    def per_fold(probs: np.ndarray) -> list[float]:
        return [logloss(labels[fold_of == k], probs[fold_of == k]) for k in range(n_folds)]

    metrics.update({
        "per_fold": per_fold(stacker.oof),
        "inner_losses": [{n: round(v, 4) for n, v in f.inner_losses.items()} for f in stacker.folds],
        "blend": [f.blend for f in stacker.folds],
        "params": [f.params for f in stacker.folds],
        "members": {name: logloss(labels, probs) for name, probs in stacker.member_oof.items()},
        "baselines": {name: logloss(labels, probs) for name, probs in reference.items()},
        "baseline_accuracy": {name: accuracy(labels, probs) for name, probs in reference.items()},
        "baseline_per_fold": {name: per_fold(probs) for name, probs in reference.items()},
        "features": {"blend_members": names, "groups": {m: list(cfg.stack.members[m].groups) for m in names},
                     "estimators": {m: (cfg.stack.members[m].estimator or {}).get("_target_", "head (pass-through)")
                                    for m in names},
                     "vectors": dict(vectors), "pca_components": int(cfg.stack.vectors.pca_components),
                     "cv_group_by": cfg.cv.group_by},
    })
    metrics["gain_over_best_baseline"] = min(metrics["baselines"][k] for k in ("prior", "length", "head")) - \
        metrics["oof_logloss"]
    metrics["_plots"] = {"stacker": stacker.oof, "head": head, "length": member_oof["text"],
                         "linear": member_oof["linear"]}
    metrics["_fold_of"], metrics["_labels"], metrics["_folds"] = fold_of, labels, stacker.folds
    return metrics


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray) -> None:
    """Kaggle submission: id + three probabilities, rows in test order, each row summing to 1."""
    probs = np.clip(probs, 1e-7, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    with artifacts.atomic_path(path) as tmp:
        pd.DataFrame({"id": ids, **dict(zip(LABEL_COLUMNS, probs.T))}).to_csv(tmp, index=False)
