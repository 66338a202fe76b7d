"""Stage-two members behind one interface: each reads some feature groups, chooses its hyper-parameters on the
inner split of a training set, refits, predicts, and exports what it learned without pickles.

Kinds (the first whose `accepts` is true builds a member from its config; a new kind is one class here, added to
MEMBER_KINDS, plus its YAML):
- HeadMember: the fine-tuned head's own probabilities (swap TTA), nothing fitted (`estimator: null`);
- StagedBoostingMember: a boosting classifier whose `predict_proba` reads any round count (`num_iteration`) and
  whose grid is over `n_estimators` alone: one fit per inner split at the largest count, read at each count;
- EstimatorMember: any scikit-learn-compatible classifier, one fit per grid point and inner split.
Every model is A/B symmetric: trained on both orientations (labels swapped), its prediction averaged with the
mirrored one's.
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import artifacts
from pipeline.data import swap_label, swap_probabilities
from pipeline.errors import UserError
from pipeline.scoring import logloss
from pipeline.stage_two.groups import GROUPS

InnerSplits = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Design:
    """A member's feature matrix for some rows in both orientations (the mirror is the A/B-swapped pair)."""

    original: np.ndarray
    mirrored: np.ndarray
    columns: list[str]

    def rows(self, index: np.ndarray) -> "Design":
        return Design(self.original[index], self.mirrored[index], self.columns)


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


@dataclass
class MemberFit:
    inner_oof: np.ndarray       # predictions for the training rows, each from a model that did not see it
    inner_loss: float
    params: dict
    model: object | None        # refitted on all training rows (None for the pass-through head)


class Member:
    """One member: its name, the feature groups it reads, and how it is fitted (see the kinds above)."""

    reads_design = True  # False: the member reads the head's probabilities directly, no feature matrix
    artifact_prefix = "member"  # its exported files: stack/fold_k/{prefix}_{name}.* ({prefix}.* for `length`)

    def __init__(self, name: str, groups: list[str]):
        self.name = name
        self.groups = groups

    @classmethod
    def accepts(cls, estimator, search: dict) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        """What the report and metrics call the member's model."""
        raise NotImplementedError

    def fit(self, x: Design | None, y: np.ndarray, inner: InnerSplits, head: np.ndarray, symmetric: bool,
            seed: int) -> MemberFit:
        """Choose hyper-parameters on the inner split (inner OOF predictions of every training row), then refit on
        every training row."""
        raise NotImplementedError

    def predict(self, fit: MemberFit, x: Design | None, head: np.ndarray, symmetric: bool) -> np.ndarray:
        raise NotImplementedError

    def export(self, fit: MemberFit, folder: Path, stem: str) -> list[str] | None:
        """Write the fitted model's learned numbers under `folder` as text / JSON / npz (never a pickle); the file
        names written, or None when this model cannot be written without a pickle."""
        return []

    def restore(self, folder: Path, files: list[str]):
        """The fitted model `export` wrote, rebuilt so that it predicts exactly as the original did."""
        return None


class HeadMember(Member):
    """The fine-tuned head's own probabilities (both orientations averaged): nothing is fitted."""

    reads_design = False

    @classmethod
    def accepts(cls, estimator, search: dict) -> bool:
        return estimator is None

    def describe(self) -> str:
        return "head (pass-through)"

    def fit(self, x, y, inner, head, symmetric, seed) -> MemberFit:
        return MemberFit(head, logloss(y, head), {}, None)

    def predict(self, fit, x, head, symmetric) -> np.ndarray:
        return head


class RangeClipper(BaseEstimator, TransformerMixin):
    """Each column clipped to the range the training rows spanned: a linear model scoring rows unlike its training
    rows (a new source, a shifted prompt group) cannot extrapolate beyond what it saw."""

    def fit(self, x: np.ndarray, y=None) -> "RangeClipper":
        self.low_, self.high_ = np.min(x, axis=0), np.max(x, axis=0)
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.low_, self.high_)


class EstimatorMember(Member):
    """Any scikit-learn-compatible classifier (built once from its `_target_`), a grid searched on the inner split,
    optionally clipped to the training range (`clip`) and standardised (`standardize`) first."""

    artifact_prefix = "linear"

    def __init__(self, name: str, groups: list[str], estimator, target: str, search: dict, standardize: bool,
                 clip: bool = False):
        super().__init__(name, groups)
        self.prototype = estimator
        self.target = target
        self.search = search
        self.standardize = standardize
        self.clip = clip

    @classmethod
    def accepts(cls, estimator, search: dict) -> bool:
        return estimator is not None

    def describe(self) -> str:
        return self.target

    def grid(self) -> list[dict]:
        keys = list(self.search)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.search[k] for k in keys))] or [{}]

    def build(self, params: dict, seed: int):
        estimator = clone(self.prototype)
        if "random_state" in estimator.get_params():
            estimator.set_params(random_state=seed)
        estimator.set_params(**params)
        steps = [RangeClipper()] * self.clip + [StandardScaler()] * self.standardize
        return make_pipeline(*steps, estimator) if steps else estimator

    def inner_predictions(self, x: Design, y: np.ndarray, inner: InnerSplits, symmetric: bool,
                          seed: int) -> Iterator[tuple[dict, np.ndarray]]:
        """(params, inner OOF predictions) for every grid point."""
        for params in self.grid():
            oof = np.zeros((len(y), 3))
            for inner_train, inner_valid in inner:
                model = fit_symmetric(self.build(params, seed), x.rows(inner_train), y[inner_train], symmetric)
                oof[inner_valid] = predict_symmetric(model, x.rows(inner_valid), symmetric)
            yield params, oof

    def fit(self, x, y, inner, head, symmetric, seed) -> MemberFit:
        best: MemberFit | None = None
        for params, oof in self.inner_predictions(x, y, inner, symmetric, seed):
            loss = logloss(y, oof)
            if best is None or loss < best.inner_loss:
                best = MemberFit(oof, loss, params, None)
        best.model = fit_symmetric(self.build(best.params, seed), x, y, symmetric)
        return best

    def predict(self, fit, x, head, symmetric) -> np.ndarray:
        return predict_symmetric(fit.model, x, symmetric)

    def export(self, fit: MemberFit, folder: Path, stem: str) -> list[str] | None:
        """A linear model's coefficients (and its scaler's statistics) as npz. Other estimators (a random forest,
        an SVM) have no pickle-free form: None (stage=predict refits them from the recorded settings instead)."""
        steps = list(fit.model.named_steps.values()) if hasattr(fit.model, "named_steps") else [fit.model]
        final = steps[-1]
        if not hasattr(final, "coef_") or not hasattr(final, "intercept_"):
            return None
        arrays = {"coef": final.coef_, "intercept": final.intercept_, "classes": final.classes_}
        scaler = next((s for s in steps if isinstance(s, StandardScaler)), None)
        if scaler is not None:
            arrays.update(scaler_mean=scaler.mean_, scaler_scale=scaler.scale_, scaler_var=scaler.var_)
        clipper = next((s for s in steps if isinstance(s, RangeClipper)), None)
        if clipper is not None:
            arrays.update(clip_low=clipper.low_, clip_high=clipper.high_)
        name = f"{stem}.npz"
        save_npz(folder / name, arrays)
        return [name]

    def restore(self, folder: Path, files: list[str]):
        arrays = load_npz(folder / files[0])
        model = clone(self.prototype)
        model.coef_, model.intercept_, model.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
        model.n_features_in_ = arrays["coef"].shape[1]
        steps = []
        if self.clip:
            clipper = RangeClipper()
            clipper.low_, clipper.high_ = arrays["clip_low"], arrays["clip_high"]
            clipper.n_features_in_ = len(clipper.low_)
            steps.append(clipper)
        if self.standardize:
            scaler = StandardScaler()
            scaler.mean_, scaler.scale_, scaler.var_ = (arrays["scaler_mean"], arrays["scaler_scale"],
                                                        arrays["scaler_var"])
            scaler.n_features_in_ = len(scaler.mean_)
            scaler.n_samples_seen_ = 0
            steps.append(scaler)
        return make_pipeline(*steps, model) if steps else model


class StagedBoostingMember(EstimatorMember):
    """A boosting classifier searched over `n_estimators` alone: fitted once per inner split at the largest count
    and read at each count (the same trees, 1/len(grid) of the work)."""

    artifact_prefix = "booster"

    @classmethod
    def accepts(cls, estimator, search: dict) -> bool:
        if estimator is None or list(search) != ["n_estimators"]:
            return False
        return "num_iteration" in inspect.signature(type(estimator).predict_proba).parameters

    def inner_predictions(self, x, y, inner, symmetric, seed):
        counts = sorted(self.search["n_estimators"])
        oofs = {n: np.zeros((len(y), 3)) for n in counts}
        for inner_train, inner_valid in inner:
            model = fit_symmetric(self.build({"n_estimators": counts[-1]}, seed), x.rows(inner_train),
                                  y[inner_train], symmetric)
            for n in counts:
                oofs[n][inner_valid] = predict_symmetric(model, x.rows(inner_valid), symmetric, num_iteration=n)
        for n in counts:
            yield {"n_estimators": n}, oofs[n]

    def export(self, fit: MemberFit, folder: Path, stem: str) -> list[str] | None:
        """The booster as LightGBM's text model (inspectable, reloadable with lightgbm.Booster(model_file=...))
        and its classes."""
        booster = getattr(fit.model, "booster_", None)
        if booster is None:
            return super().export(fit, folder, stem)
        with artifacts.atomic_path(folder / f"{stem}.txt") as tmp:
            booster.save_model(str(tmp))
        save_npz(folder / f"{stem}.classes.npz", {"classes": fit.model.classes_})
        return [f"{stem}.txt", f"{stem}.classes.npz"]

    def restore(self, folder: Path, files: list[str]):
        import lightgbm

        if not files[0].endswith(".txt"):
            return super().restore(folder, files)
        return BoosterClassifier(lightgbm.Booster(model_file=str(folder / files[0])),
                                 load_npz(folder / files[1])["classes"])


class BoosterClassifier:
    """A LightGBM booster read back from its text model, answering predict_proba as the LGBMClassifier that
    trained it does (same trees, same softmax)."""

    def __init__(self, booster, classes: np.ndarray):
        self.booster = booster
        self.classes_ = classes

    def predict_proba(self, x: np.ndarray, **predict_params) -> np.ndarray:
        return self.booster.predict(x, **predict_params)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with artifacts.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays only: `allow_pickle=False`, so an edited file cannot carry objects."""
    if not path.is_file():
        raise UserError(f"{path} not found; the export is incomplete: run stage=export again")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is damaged ({exc}); run stage=export again") from None


MEMBER_KINDS: tuple[type[Member], ...] = (HeadMember, StagedBoostingMember, EstimatorMember)


def member_from_config(name: str, node: DictConfig) -> Member:
    """Build `stack.members.<name>`: its groups checked and its estimator instantiated once, so a mistyped
    `_target_` or grid key is an `error:` at validation time, before any model loads."""
    from hydra.utils import instantiate

    key = f"stack.members.{name}"
    groups = list(node.groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UserError(f"{key}.groups: unknown {unknown}; choose from {', '.join(GROUPS)}")
    search = OmegaConf.to_container(node.search, resolve=True) if node.get("search") else {}
    estimator = None
    if node.estimator is not None:
        target = node.estimator.get("_target_")
        try:
            estimator = instantiate(node.estimator, _convert_="all")
        except Exception as exc:  # Hydra wraps import and argument errors alike
            message = " ".join(str(exc).split())[:300]
            raise UserError(f"{key}.estimator: cannot build {target} ({message})") from None
        if not hasattr(estimator, "predict_proba") or not hasattr(estimator, "get_params"):
            raise UserError(f"{key}.estimator: {target} is not a scikit-learn-compatible classifier with "
                            "predict_proba")
        unknown_params = [p for p in search if p not in estimator.get_params()]
        if unknown_params:
            raise UserError(f"{key}.search: {unknown_params} are not parameters of {target}")
    elif groups != ["head"]:
        raise UserError(f"{key}: estimator null (pass-through) works only for groups [head]")
    kind = next(k for k in MEMBER_KINDS if k.accepts(estimator, search))
    if kind is HeadMember:
        return HeadMember(name, groups)
    return kind(name, groups, estimator, str(target), search, bool(node.get("standardize", False)),
                bool(node.get("clip", False)))
