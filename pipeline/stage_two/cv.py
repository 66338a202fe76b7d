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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline import feature_table
from pipeline.folds import inner_splits
from pipeline.scoring import accuracy, fold_prior, logloss
from pipeline.stage_two import pooling
from pipeline.stage_two.design import design, fit_reducers, head_prediction, stacker_inputs
from pipeline.stage_two.features import PairInputs
from pipeline.stage_two.groups import GROUPS
from pipeline.stage_two.members import Member, MemberFit
from pipeline.stage_two.spec import StackSpec
from pipeline.stage_two.store import FoldModel

if TYPE_CHECKING:
    from pipeline.context import RunContext

log = logging.getLogger(__name__)


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

    def within_training_folds(self, k: int) -> "StackData":
        """The rows of the folds other than k, those folds renumbered 0..K-2 (no test rows): stage two fitted on it
        never sees fold k's labels."""
        index = np.flatnonzero(self.fold_of != k)
        fold_of = np.unique(self.fold_of[index], return_inverse=True)[1]
        return StackData(self.pair.take(index), self.labels[index], fold_of, self.groups[index], self.vectors,
                         None, self.group_by)


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
    reduced = any(GROUPS[g].reduced for m in members for g in m.groups)
    reducers = fit_reducers(pair, train, data.vectors, spec.vectors.pca_components, spec.seed) if reduced else {}
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


def nested_oof(data: StackData, spec: StackSpec, k: int) -> np.ndarray:
    """Stage two cross-fitted within the training folds of outer fold k: each row of the other folds predicted by
    the stacker fitted on the remaining ones (rows in train order, fold k's rows left out). Neither the row's own
    label nor any of fold k's reaches its prediction: a distillation teacher's targets for student fold k."""
    return cross_validate(data.within_training_folds(k), spec, spec.members).oof


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
    finetune_state = feature_table.finetune_fold_states(ctx)[0]  # every fold checked once
    features = feature_table.oof_features(ctx, finetune_state)
    test = stacker_inputs(ctx.test.frame, feature_table.test_features(ctx, finetune_state)) \
        if with_test and ctx.test is not None else None
    data = StackData(stacker_inputs(ctx.train.frame, features), ctx.labels, ctx.fold_of, ctx.groups,
                     spec.vectors.settings(features.vectors), test, str(ctx.cfg.cv.group_by))
    return evaluate(data, spec, baselines)
