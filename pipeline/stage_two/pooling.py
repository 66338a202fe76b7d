"""How stage two combines its members, and how much damage one member can do (pure numpy / scipy).

- **Calibration**: each member's probabilities are tempered, p ∝ p^(1/T), with one T per member fitted on its inner
  out-of-fold predictions (rows of the outer training set only), so no member is more confident than it earned.
- **Pools** (`stack.pooling`), one interface, recorded per fold as numbers:
  - `linear`: a mixture p = Σ_m w_m p_m + w_0 · prior, weights on the simplex, the class prior of the training rows
    one of the components. Its damage is bounded: by convexity of -log, on every row and so on every group of rows,
    loss(pool) ≤ Σ_m w_m loss(m) + w_0 loss(prior), and loss(pool) ≤ loss(m) + log(1 / w_m) for each m. A member
    that is confidently wrong on a shifted group costs at most its weight times its excess loss there.
  - `geometric`: p ∝ Π_m p_m^w_m · prior^w_0, weights on the simplex: the members' evidence multiplied, with the
    same bound (Σ_c Π_m p_mc^w_m <= 1 by the weighted AM-GM inequality);
  - `log_linear`: the earlier blend, p ∝ exp(Σ_m w_m log p_m + tie bias), w_m in [0, 5]: sharper, unbounded.
- **Group-robust weights** (`stack.blend_robust` = ρ): the pool's weights minimise (1 - ρ) · mean inner loss +
  ρ · the worst inner split's loss (a smooth maximum), so a member good on average but bad on some groups gets
  little weight.
- **Fallback** (`stack.fallback_margin`): when the pool loses to the best single member on some inner split by more
  than the margin (and by more than `select_z` standard errors there), the inner splits disagree about the pool,
  and the fold is scored by that member.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar

EPS = 1e-7
POOLINGS = ("linear", "geometric", "log_linear")
TEMPERATURE_RANGE = (0.25, 10.0)
SMOOTH_MAX_SHARPNESS = 50.0  # the worst split's loss as (1/β) log Σ exp(β L_j): within log(J)/β of the maximum


def row_losses(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1))


def mean_loss(y: np.ndarray, probs: np.ndarray) -> float:
    return float(row_losses(y, probs).mean())


# ------------------------------------------------------------------------------------------------- calibration
def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p ∝ p^(1/T); T = 1 leaves the probabilities exactly as they are."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs, EPS, 1)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE that minimises the log loss of tempered `probs` (inner OOF predictions)."""
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    result = minimize_scalar(lambda log_t: mean_loss(y, temper(probs, float(np.exp(log_t)))), bounds=(low, high),
                             method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(result.x))
    # Keep T = 1 unless tempering actually pays (a flat optimum must not move predictions for nothing).
    return best if mean_loss(y, temper(probs, best)) < mean_loss(y, probs) - 1e-6 else 1.0


# ------------------------------------------------------------------------------------------------------- pools
class Pool:
    """Combines member probabilities (one (n, 3) array per member, in member order) into one prediction."""

    kind: str

    def predict(self, member_probs: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def record(self, names: list[str]) -> dict:
        """The pool as numbers (model.json, export.json, metrics): rebuilt exactly by `pool_from_record`."""
        raise NotImplementedError


@dataclass
class LogLinearPool(Pool):
    """p ∝ exp(Σ_m w_m log p_m + [0, 0, tie_bias]), w_m >= 0: A/B symmetric whenever the members are."""

    weights: np.ndarray
    tie_bias: float
    kind = "log_linear"

    def predict(self, member_probs: list[np.ndarray]) -> np.ndarray:
        logits = sum(w * np.log(np.clip(p, EPS, 1)) for w, p in zip(self.weights, member_probs))
        logits = logits + np.array([0.0, 0.0, self.tie_bias])
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def record(self, names: list[str]) -> dict:
        return {"weights": self.weights.tolist(), "tie_bias": self.tie_bias}


@dataclass
class LinearPool(Pool):
    """p = Σ_m w_m p_m + prior_weight · prior, weights on the simplex (see the module docstring for the bound)."""

    weights: np.ndarray
    prior_weight: float
    prior: np.ndarray
    kind = "linear"

    def predict(self, member_probs: list[np.ndarray]) -> np.ndarray:
        probs = sum(w * p for w, p in zip(self.weights, member_probs)) + self.prior_weight * self.prior
        return probs / probs.sum(axis=1, keepdims=True)

    def record(self, names: list[str]) -> dict:
        return {"kind": self.kind, "weights": self.weights.tolist(), "prior_weight": self.prior_weight,
                "prior": self.prior.tolist()}


@dataclass
class GeometricPool(Pool):
    """p ∝ Π_m p_m^w_m · prior^prior_weight, weights on the simplex: the members' evidence multiplied (as the
    log-linear blend does) but never sharpened beyond them. Since Σ_c Π_m p_mc^w_m <= Σ_c Σ_m w_m p_mc = 1, its loss
    on every row is at most Σ_m w_m loss_m + prior_weight · loss_prior, the linear pool's bound."""

    weights: np.ndarray
    prior_weight: float
    prior: np.ndarray
    kind = "geometric"

    def predict(self, member_probs: list[np.ndarray]) -> np.ndarray:
        logits = sum(w * np.log(np.clip(p, EPS, 1)) for w, p in zip(self.weights, member_probs)) + \
            self.prior_weight * np.log(self.prior)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def record(self, names: list[str]) -> dict:
        return {"kind": self.kind, "weights": self.weights.tolist(), "prior_weight": self.prior_weight,
                "prior": self.prior.tolist()}


SIMPLEX_POOLS = {"linear": LinearPool, "geometric": GeometricPool}


def pool_from_record(record: dict) -> Pool:
    """Inverse of Pool.record; a record without `kind` is a log-linear blend (stackers made before pools)."""
    if record.get("kind", "log_linear") == "log_linear":
        return LogLinearPool(np.asarray(record["weights"], dtype=np.float64), float(record["tie_bias"]))
    return SIMPLEX_POOLS[record["kind"]](np.asarray(record["weights"], dtype=np.float64),
                                         float(record["prior_weight"]), np.asarray(record["prior"], dtype=np.float64))


@dataclass(frozen=True)
class PoolSettings:
    kind: str          # linear | log_linear
    l2: float          # log_linear: L2 on the weights
    robust: float      # weight of the worst inner split in the objective (0: the mean alone)


def _objective(settings: PoolSettings, y: np.ndarray, groups: list[np.ndarray]):
    """Mean row loss, mixed with the smooth maximum of the per-group losses when `robust` > 0."""
    def loss(probs: np.ndarray) -> float:
        rows = row_losses(y, probs)
        value = float(rows.mean())
        if settings.robust > 0 and len(groups) > 1:
            split = np.array([rows[g].mean() for g in groups])
            worst = float(np.log(np.exp(SMOOTH_MAX_SHARPNESS * (split - split.max())).sum()) / SMOOTH_MAX_SHARPNESS
                          + split.max())
            value = (1 - settings.robust) * value + settings.robust * worst
        return value
    return loss


def fit_pool(settings: PoolSettings, member_probs: list[np.ndarray], y: np.ndarray,
             groups: list[np.ndarray]) -> Pool:
    """The pool's parameters on the training rows' (inner OOF) member predictions; `groups`: the rows of each inner
    validation split, for the group-robust part of the objective."""
    objective = _objective(settings, y, groups)
    n = len(member_probs)
    if settings.kind == "log_linear":
        def loss(theta: np.ndarray) -> float:
            return objective(LogLinearPool(theta[:-1], theta[-1]).predict(member_probs)) + \
                settings.l2 * float(np.sum(theta[:-1] ** 2))

        start = np.array([1.0 / n] * n + [0.0])
        result = minimize(loss, start, method="L-BFGS-B", bounds=[(0.0, 5.0)] * n + [(-5.0, 5.0)])
        return LogLinearPool(result.x[:-1], float(result.x[-1]))
    counts = np.bincount(y, minlength=3).astype(np.float64) / len(y)
    prior = np.array([(counts[0] + counts[1]) / 2] * 2 + [counts[2]])  # a and b alike: the pool stays A/B symmetric

    def simplex(theta: np.ndarray) -> np.ndarray:
        e = np.exp(theta - theta.max())
        return e / e.sum()

    def pool(theta: np.ndarray) -> Pool:
        w = simplex(theta)
        return SIMPLEX_POOLS[settings.kind](w[:-1], float(w[-1]), prior)

    start = np.zeros(n + 1)
    start[-1] = -2.0  # the prior starts with a small share: a component to fall back on, not a default
    result = minimize(lambda t: objective(pool(t).predict(member_probs)), start, method="L-BFGS-B",
                      bounds=[(-12.0, 12.0)] * (n + 1))
    return pool(result.x)


def pool_inner_oof(settings: PoolSettings, member_probs: list[np.ndarray], y: np.ndarray,
                   inner: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The pool's own inner-CV predictions: fitted on the other inner folds' member predictions (robust over those
    folds' own groups)."""
    oof = np.zeros((len(y), 3))
    for j, (inner_train, inner_valid) in enumerate(inner):
        # The other inner splits partition inner_train: its groups for the robust objective.
        groups = [np.flatnonzero(np.isin(inner_train, va)) for i, (_, va) in enumerate(inner) if i != j]
        pool = fit_pool(settings, [p[inner_train] for p in member_probs], y[inner_train], groups)
        oof[inner_valid] = pool.predict([p[inner_valid] for p in member_probs])
    return oof


# ---------------------------------------------------------------------------------------------------- fallback
@dataclass(frozen=True)
class Fallback:
    member: str
    split: int
    excess: float

    def reason(self) -> str:
        return (f"fallback to {self.member}: the blend lost to it by {self.excess:.3f} on inner split {self.split} "
                "(the inner splits disagree)")


def fallback(y: np.ndarray, blend_oof: np.ndarray, member_oof: dict[str, np.ndarray],
             inner: list[tuple[np.ndarray, np.ndarray]], margin: float | None, z: float) -> Fallback | None:
    """The best single member (by inner loss) when the blend loses to it on some inner split by more than `margin`
    and by more than `z` standard errors of that split's paired per-row difference (a small split's noise is no
    disagreement); None when the splits agree (or `margin` is None)."""
    if margin is None or not member_oof:
        return None
    best = min(member_oof, key=lambda name: mean_loss(y, member_oof[name]))
    worst: Fallback | None = None
    for j, (_, va) in enumerate(inner):
        diff = row_losses(y[va], blend_oof[va]) - row_losses(y[va], member_oof[best][va])
        excess, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else np.inf
        if excess > margin and excess > z * se and (worst is None or excess > worst.excess):
            worst = Fallback(best, j, excess)
    return worst
