"""Stack and predict stages: OOF coverage, honest baselines, submission format, members/blend/selection."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import artifacts, folds, inputs

from pipeline.stage_two import cv, design

from pipeline.stage_two.spec import StackSpec, VectorRequest
from pipeline.stage_two import members, pooling
from pipeline.data import LABEL_COLUMNS, load_pairs
from pipeline.errors import UserError
from pipeline.scoring import logloss, prior_probs
from pipeline.stages import predict, stack
from conftest import compose_cfg


def test_oof_and_metrics(tiny_experiment):
    cfg, exp, metrics = tiny_experiment
    oof = pd.read_parquet(exp / "stack" / "oof.parquet")
    folds = pd.read_parquet(exp / "folds.parquet")
    assert oof["id"].is_unique and set(oof["id"]) == set(folds["id"])
    np.testing.assert_allclose(oof[list(LABEL_COLUMNS)].sum(axis=1), 1, rtol=1e-6)
    st = metrics["stack"]
    assert set(st["baselines"]) == {"prior", "length", "head", "linear"}
    assert set(st["members"]) == set(cfg.stack.blend_members)
    assert len(st["chosen"]) == cfg.cv.n_folds
    assert all(c in [*cfg.stack.blend_members, "blend"] for c in st["chosen"])
    labels = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame["label"].to_numpy()
    assert st["oof_logloss"] == pytest.approx(logloss(labels, oof[list(LABEL_COLUMNS)].to_numpy()), rel=1e-6)
    # The stacker's OOF is exactly what the chosen candidate predicted on each fold: refit stage two on the same
    # features and rebuild each fold's rows from the chosen member or the blend of the members.
    from pipeline import context

    cfg = compose_cfg(_overrides(cfg))
    result = cv.score(context.open_run(cfg, "stack"), StackSpec.from_config(cfg.stack, cfg.seed))
    np.testing.assert_allclose(oof[list(LABEL_COLUMNS)].to_numpy(), result.oof, rtol=1e-12)
    for k, fold in enumerate(result.folds):
        names = list(cfg.stack.blend_members)
        expected = fold.model.blend.predict([fold.member_probs[n] for n in names]) if fold.chosen == "blend" else \
            fold.member_probs[fold.chosen]
        np.testing.assert_array_equal(result.oof[result.data.fold_of == k], expected)
    report = (exp / "stack" / "report.md").read_text()
    assert "\n| stacker | " in report and "## Per fold" in report and "layers" in report
    assert artifacts.read_state(exp / "stack")["done"]
    assert not list(exp.rglob("*.pkl")), "no artifact may need unpickling"


def test_rerun_without_a_test_file_removes_the_old_submission(tiny_experiment, tmp_path):
    """A submission never sits beside boosters that did not make it."""
    import shutil

    cfg, exp, _ = tiny_experiment
    copy = tmp_path / cfg.exp_name
    shutil.copytree(exp, copy)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    assert (copy / "submission.csv").exists()
    train = next((tmp_path / "demo_data").glob("demo_train_*.csv"))
    from conftest import TINY_OVERRIDES

    predict.run(compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"exp_name={cfg.exp_name}",
                             f"paths.model_cache_dir={cfg.paths.model_cache_dir}", "stage=predict"]))
    assert "predict" in artifacts.read_metrics(copy)  # so its removal below is exercised
    stack.run(compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"exp_name={cfg.exp_name}",
                           f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"data.train={train}"]))
    assert not (copy / "submission.csv").exists()
    assert "predict" not in artifacts.read_metrics(copy)


def check_submission(path, ids):
    sub = pd.read_csv(path, dtype={"id": str})
    assert list(sub.columns) == ["id", *LABEL_COLUMNS]
    assert list(sub["id"]) == list(ids)
    np.testing.assert_allclose(sub[list(LABEL_COLUMNS)].sum(axis=1), 1, atol=1e-6)
    assert (sub[list(LABEL_COLUMNS)] > 0).all().all()


def test_submission_in_test_order(tiny_experiment):
    cfg, exp, _ = tiny_experiment
    test = pd.read_csv(next((exp.parent / "demo_data").glob("demo_test_*.csv")), dtype={"id": str})
    check_submission(exp / "submission.csv", test["id"])


def _overrides(cfg):
    from conftest import TINY_OVERRIDES

    return [*TINY_OVERRIDES, f"paths.output_dir={cfg.paths.output_dir}",
            f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}"]


def test_predict_scores_a_new_test_file(tiny_experiment, tmp_path):
    cfg, exp, _ = tiny_experiment
    test = pd.read_csv(next((exp.parent / "demo_data").glob("demo_test_*.csv")))
    new = test.iloc[::-1].head(7).copy()
    new["id"] = [f"new-{i}" for i in range(len(new))]
    new.to_csv(tmp_path / "new_test.csv", index=False)
    cfg = compose_cfg([*_overrides(cfg), f"data.test={tmp_path / 'new_test.csv'}", "stage=predict"])
    metrics = predict.run(cfg)
    assert metrics["n_rows"] == 7
    check_submission(metrics["submission"], new["id"])


def test_predict_refit_reproduces_the_stack_submission(tiny_experiment, tmp_path):
    """predict refits the stacker from the recorded settings: on the demo test file it gives stack's numbers."""
    cfg, exp, _ = tiny_experiment
    stack.run(compose_cfg(_overrides(cfg)))  # the demo test file's submission, whatever ran before
    made_by_stack = pd.read_csv(exp / "submission.csv")
    predict.run(compose_cfg([*_overrides(cfg), "stage=predict"]))
    pd.testing.assert_frame_equal(pd.read_csv(exp / "submission.csv"), made_by_stack)


@pytest.mark.parametrize("override, key", [("embed.layers=[0.5]", "embed.layers"),
                                           ("embed.pooling=last", "embed.pooling"),
                                           ("model.max_length=100", "model.max_length"),
                                           ("cv.n_folds=2", "cv.n_folds")])
def test_predict_refuses_settings_other_than_the_stackers(tiny_experiment, tmp_path, override, key):
    """A changed model/embed/cv setting would make test features the stacker never saw: refused by name."""
    cfg, exp, _ = tiny_experiment
    before = (exp / "submission.csv").read_text()
    cfg = compose_cfg([*_overrides(cfg), "stage=predict", override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        predict.run(cfg)
    assert (exp / "submission.csv").read_text() == before


def test_stack_refuses_features_made_with_other_embed_settings(tiny_experiment):
    cfg, _, _ = tiny_experiment
    with pytest.raises(UserError, match="other settings.*config_hash"):
        stack.run(compose_cfg([*_overrides(cfg), "embed.pooling=last"]))


def synthetic(n=600, d=6, seed=0, signal=1.0):
    """Pairs whose response_a / response_b vectors carry the label (diff of dimension 0), plus a weak head."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, n, p=[0.4, 0.4, 0.2])
    quality = np.where(labels == 0, 1.0, np.where(labels == 1, -1.0, 0.0)) * signal
    vectors = {}
    for orientation in ("fwd", "swp"):
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        a[:, 0] += quality
        b[:, 0] -= quality
        vectors.update({f"h100_a_{orientation}": a, f"h100_b_{orientation}": b,
                        f"h100_prompt_{orientation}": rng.normal(size=(n, d)),
                        f"h100_verdict_{orientation}": rng.normal(size=(n, d))})
    head = rng.dirichlet([5, 5, 3], n)
    words = lambda: [[" ".join(["w"] * int(k))] for k in rng.integers(1, 30, n)]  # noqa: E731
    frame = pd.DataFrame({"prompt": words(), "response_a": words(), "response_b": words()})
    from pipeline.stage_two.features import text_inputs
    from dataclasses import replace

    pair = replace(text_inputs(frame), head=head, head_other=head[:, [1, 0, 2]], vectors=vectors)
    return pair, labels, np.arange(n) % 3, np.arange(n)


VECTORS = {"layers": ["h100"], "kinds": ["diff"], "orientations": ["fwd", "swp"], "prefix": ""}


def stack_spec(*overrides) -> StackSpec:
    cfg = compose_cfg(["stack.vectors.pca_components=0", "stack.inner_folds=3", *overrides])
    return StackSpec.from_config(cfg.stack, 0)


def run_cv(pair, labels, fold_of, groups, names, *overrides):
    spec = stack_spec(f"stack.blend_members=[{','.join(names)}]", *overrides)
    return cv.cross_validate(cv.StackData(pair, labels, fold_of, groups, VECTORS), spec, spec.members)


def test_vector_member_learns_a_real_signal_and_not_noise():
    pair, labels, fold_of, groups = synthetic()
    prior = logloss(labels, prior_probs(labels, len(labels)))
    assert logloss(labels, run_cv(pair, labels, fold_of, groups, ["vectors"]).oof) < prior - 0.15
    noise, labels, fold_of, groups = synthetic(signal=0.0)
    assert logloss(labels, run_cv(noise, labels, fold_of, groups, ["vectors"]).oof) > prior - 0.03


def test_selection_never_lets_a_useless_group_spoil_the_best_member():
    """Adding a noise-only member must leave the stacker about as good as the informative member alone."""
    pair, labels, fold_of, groups = synthetic(signal=0.6)
    alone = logloss(labels, run_cv(pair, labels, fold_of, groups, ["vectors"]).oof)
    with_noise = run_cv(pair, labels, fold_of, groups, ["vectors", "text"])  # text stats are pure noise here
    assert logloss(labels, with_noise.oof) < alone + 0.01


def test_choices_never_see_the_scored_fold():
    """Fold 0's OOF predictions depend only on the other folds' labels: scrambling fold 0's labels leaves them
    unchanged (every round, weight and choice was made without them), while fold 1's, trained on fold 0, move."""
    pair, labels, fold_of, groups = synthetic()
    first = run_cv(pair, labels, fold_of, groups, ["head", "vectors"])
    scrambled = labels.copy()
    scrambled[fold_of == 0] = np.random.default_rng(1).permutation(scrambled[fold_of == 0])
    second = run_cv(pair, scrambled, fold_of, groups, ["head", "vectors"])
    np.testing.assert_allclose(first.oof[fold_of == 0], second.oof[fold_of == 0])
    assert not np.allclose(first.oof[fold_of == 1], second.oof[fold_of == 1])


@pytest.mark.parametrize("kind", pooling.POOLINGS)
def test_blend_recovers_the_informative_member(kind):
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    good = np.full((n, 3), 0.2)
    good[np.arange(n), y] = 0.6
    noise = rng.dirichlet([1, 1, 1], n)
    blend = pooling.fit_pool(pooling.PoolSettings(kind, 0.001, 0.0), [noise, good], y, [])
    assert blend.weights[1] > (1 if kind == "log_linear" else 0.8) and blend.weights[0] < 0.05
    assert logloss(y, blend.predict([noise, good])) < logloss(y, good) + (0 if kind == "log_linear" else 2e-3)


@pytest.mark.parametrize("blend", [pooling.LogLinearPool(np.array([0.7, 1.3]), 0.4),
                                   pooling.LinearPool(np.array([0.3, 0.6]), 0.1, np.array([0.4, 0.4, 0.2])),
                                   pooling.GeometricPool(np.array([0.3, 0.6]), 0.1, np.array([0.4, 0.4, 0.2]))])
def test_blend_is_ab_symmetric(blend):
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet([1, 1, 1], 50) for _ in range(2)]
    mirrored = blend.predict([p[:, [1, 0, 2]] for p in probs])
    np.testing.assert_allclose(mirrored, blend.predict(probs)[:, [1, 0, 2]])


def test_any_sklearn_classifier_by_target():
    pair, labels, fold_of, groups = synthetic()
    result = run_cv(pair, labels, fold_of, groups, ["vectors"],
                    "stack.members.vectors.estimator._target_=sklearn.ensemble.RandomForestClassifier",
                    "~stack.members.vectors.estimator.max_iter", "~stack.members.vectors.search.C",
                    "+stack.members.vectors.search.n_estimators=[50]")
    prior = logloss(labels, prior_probs(labels, len(labels)))
    assert logloss(labels, result.oof) < prior - 0.05
    assert type(result.folds[0].fits["vectors"].model[-1]).__name__ == "RandomForestClassifier"


def test_unknown_member_and_group_are_user_errors():
    with pytest.raises(UserError, match="stack.blend_members names \\['nope'\\]"):
        stack_spec("stack.blend_members=[head,nope]")
    with pytest.raises(UserError, match="stack.members.text.groups: unknown \\['colour'\\]"):
        stack_spec("stack.members.text.groups=[text,colour]")
    with pytest.raises(UserError, match="stack.baselines names \\['nope'\\]"):
        stack_spec("stack.baselines.length=nope")


def test_pass_through_head_member_predicts_the_tta_head():
    pair, labels, fold_of, groups = synthetic()
    head = (pair.head + pair.head_other) / 2
    result = run_cv(pair, labels, fold_of, groups, ["head"], "stack.calibrate=false")
    np.testing.assert_allclose(result.oof, head)
    calibrated = run_cv(pair, labels, fold_of, groups, ["head"], "stack.calibrate=true")  # tempered per fold by its inner OOF's T
    for k, fold in enumerate(calibrated.folds):
        np.testing.assert_array_equal(calibrated.oof[fold_of == k],
                                      pooling.temper(head[fold_of == k], fold.model.temperatures["head"]))


def test_staged_lightgbm_search_equals_separate_fits():
    """Reading one 200-round model at 25/50/100/200 rounds gives what four separate fits give."""
    pair, labels, fold_of, groups = synthetic(n=300)
    member = stack_spec().baselines["length"]
    assert isinstance(member, members.StagedBoostingMember)
    x = design.design(pair, member.groups, VECTORS, {})
    inner = folds.inner_splits(labels, groups, 3, 0)
    staged = dict((p["n_estimators"], oof) for p, oof in member.inner_predictions(x, labels, inner, True, 0))
    for n in (25, 200):
        separate = np.zeros((len(labels), 3))
        for tr, va in inner:
            model = members.fit_symmetric(member.build({"n_estimators": n}, 0), x.rows(tr), labels[tr], True)
            separate[va] = members.predict_symmetric(model, x.rows(va), True)
        np.testing.assert_allclose(staged[n], separate, atol=1e-9)


def test_evaluate_baselines_are_their_members_cross_validated_alone():
    """The `length` baseline is the member stack.baselines names (text) cross-validated on the same folds: the
    same numbers whether that member is blended or fitted alone for the baseline."""
    pair, labels, fold_of, groups = synthetic(n=300)
    data = cv.StackData(pair, labels, fold_of, groups, VECTORS)
    for members_ in ("[head,text]", "[head,vectors]"):
        spec = stack_spec(f"stack.blend_members={members_}")
        result = cv.evaluate(data, spec)
        alone = cv.cross_validate(data, spec, [spec.baselines["length"]]).oof
        np.testing.assert_allclose(result.baselines["length"], alone)
        np.testing.assert_allclose(result.baselines["head"], (pair.head + pair.head_other) / 2)
        metrics = result.metrics()
        assert metrics["baselines"]["length"] == pytest.approx(logloss(labels, alone))
        assert list(metrics["baselines"]) == ["prior", "length", "head", "linear"]
        assert metrics["members"].keys() == set(members_.strip("[]").split(","))


def test_select_candidate_needs_a_clear_paired_margin():
    rng = np.random.default_rng(0)
    n = 500
    y = rng.integers(0, 3, n)
    blend = np.full((n, 3), 1 / 3)
    sharp = np.full((n, 3), 0.1)
    sharp[np.arange(n), y] = 0.8
    # Better on every row by a little: a consistent paired gain is clear, however small.
    steady = blend.copy()
    steady[np.arange(n), y] += 0.002
    assert cv.select_candidate(y, blend, {"steady": steady / steady.sum(1, keepdims=True)}, z=2.0) == "steady"
    # Better on half the rows and as much worse on the other half (a tiny net gain): noise, the blend stays.
    p_true = np.where(np.arange(n) % 2 == 0, 0.40, 0.28)
    noisy = np.repeat(((1 - p_true) / 2)[:, None], 3, axis=1)
    noisy[np.arange(n), y] = p_true
    assert np.mean(pooling.row_losses(y, blend) - pooling.row_losses(y, noisy)) > 0
    assert cv.select_candidate(y, blend, {"noisy": noisy}, z=2.0) == "blend"
    # Among clear winners the larger gain wins; a worse member never replaces the blend.
    assert cv.select_candidate(y, blend, {"sharp": sharp, "steady": steady}, z=2.0) == "sharp"
    assert cv.select_candidate(y, sharp, {"uniform": blend}, z=0.0) == "blend"


def test_a_mistyped_estimator_is_refused_at_check_time(tiny_cfg):
    """stage=check builds every member's estimator: a misspelt `_target_` or grid key fails there, before any
    fine-tune."""
    from pipeline import validation

    with pytest.raises(UserError, match="stack.members.text.estimator: cannot build lightgbm.LGBMClassifer"):
        validation.validate(tiny_cfg("stack.members.text.estimator._target_=lightgbm.LGBMClassifer"))
    with pytest.raises(UserError, match=r"stack.members.summary.search: \['Cee'\] are not parameters"):
        validation.validate(tiny_cfg("+stack.members.summary.search.Cee=[1.0]"))


def test_verdict_diff_without_the_swapped_pass_is_one_error():
    """embed.swap_tta=false leaves one orientation: the default vector block verdict_diff cannot be made, and says
    so (it was a KeyError traceback)."""
    vectors = {f"h050_{span}_fwd": np.zeros((4, 3)) for span in ("prompt", "a", "b", "verdict")}
    request = StackSpec.from_config(compose_cfg([]).stack, 0).vectors
    with pytest.raises(UserError, match="verdict_diff.*embed.swap_tta=false"):
        request.settings(vectors)
    assert VectorRequest("finetuned", None, ["diff"], ["fwd", "swp"], 4).settings(vectors)["layers"] == ["h050"]


# ------------------------------------------------------------------------------------- bounded damage (pooling)
def shifted_members(seed: int = 0):
    """Labels, and two members: `steady` is mildly right everywhere; `brittle` is sharper and right on the usual
    rows, confidently wrong on a shifted group (the last quarter of the rows)."""
    rng = np.random.default_rng(seed)
    n = 800
    y = rng.integers(0, 3, n)
    shifted = np.arange(n) >= 3 * n // 4
    steady = np.full((n, 3), 0.25)
    steady[np.arange(n), y] = 0.5
    brittle = np.full((n, 3), 0.05)
    wrong = (y + 1) % 3
    brittle[np.arange(n), np.where(shifted, wrong, y)] = 0.9
    return y, shifted, steady, brittle


@pytest.mark.parametrize("kind", ["linear", "geometric"])
def test_a_confidently_wrong_member_cannot_push_the_pool_above_its_bound(kind):
    """The linear pool's weights are fitted on the usual rows, where the brittle member looks best; on the shifted
    group, its loss stays below the documented bound Σ w_m loss_m + w_0 loss_prior (and below loss_m + log 1/w_m
    for every component), while the log-linear blend fitted on the same rows goes far above its members' mix."""
    y, shifted, steady, brittle = shifted_members()
    train = ~shifted
    linear = pooling.fit_pool(pooling.PoolSettings(kind, 0.0, 0.0), [steady[train], brittle[train]], y[train], [])
    assert linear.weights[1] > linear.weights[0]  # the brittle member earned its weight on the usual rows
    group = [steady[shifted], brittle[shifted]]
    pooled = logloss(y[shifted], linear.predict(group))
    member_losses = [logloss(y[shifted], p) for p in group]
    prior_loss = logloss(y[shifted], np.tile(linear.prior, (int(shifted.sum()), 1)))
    bound = float(np.dot(linear.weights, member_losses) + linear.prior_weight * prior_loss)
    assert pooled <= bound + 1e-12
    if kind == "linear":  # a mixture also keeps each component's loss within log(1 / its weight)
        for w, loss in zip(linear.weights, member_losses):
            assert pooled <= loss + np.log(1 / w) + 1e-12
    log_linear = pooling.fit_pool(pooling.PoolSettings("log_linear", 0.001, 0.0), [steady[train], brittle[train]],
                                  y[train], [])
    assert logloss(y[shifted], log_linear.predict(group)) > bound


def test_group_robust_weights_move_weight_off_a_member_bad_on_one_group():
    """With the shifted group among the inner splits, the robust objective (blend_robust > 0) gives the brittle
    member less weight than the mean alone does."""
    y, shifted, steady, brittle = shifted_members()
    groups = [np.flatnonzero(~shifted)[i::3] for i in range(3)] + [np.flatnonzero(shifted)]
    mean_only = pooling.fit_pool(pooling.PoolSettings("linear", 0.0, 0.0), [steady, brittle], y, groups)
    robust = pooling.fit_pool(pooling.PoolSettings("linear", 0.0, 0.8), [steady, brittle], y, groups)
    assert robust.weights[1] < mean_only.weights[1]
    worst = lambda pool: max(logloss(y[g], pool.predict([steady[g], brittle[g]])) for g in groups)  # noqa: E731
    assert worst(robust) < worst(mean_only)


def test_temperature_calibration_never_leaves_a_member_overconfident():
    rng = np.random.default_rng(1)
    n = 600
    y = rng.integers(0, 3, n)
    favoured = np.where(rng.random(n) < 0.1, y, rng.integers(0, 3, n))  # right 40% of the time: 0.4 is honest
    honest = np.full((n, 3), 0.3)
    honest[np.arange(n), favoured] = 0.4
    overconfident = pooling.temper(honest, 0.2)  # the same ranking, far too sure
    t = pooling.fit_temperature(overconfident, y)
    assert t > 3 and logloss(y, pooling.temper(overconfident, t)) < logloss(y, overconfident) - 0.1
    assert pooling.fit_temperature(np.full((n, 3), 1 / 3), y) == 1.0  # nothing to gain: left exactly as it is


def test_clipping_keeps_a_linear_member_within_its_training_range():
    """A standardised logistic regression with `clip` scores a row far outside the training range exactly as the
    row clipped to that range: it cannot extrapolate; without `clip` it does."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int)
    design = members.Design(x, -x, [f"c{j}" for j in range(4)])
    spec = stack_spec()
    clipped = spec.baselines["linear"]
    assert clipped.clip
    far = members.Design(x[:5] * 100, -x[:5] * 100, design.columns)
    both = np.concatenate([x, -x])  # a symmetric member trains on both orientations: the range spans both
    at_edge = members.Design(np.clip(x[:5] * 100, both.min(0), both.max(0)),
                             np.clip(-x[:5] * 100, both.min(0), both.max(0)), design.columns)
    model = members.fit_symmetric(clipped.build({"C": 1.0}, 0), design, y, True)
    np.testing.assert_array_equal(members.predict_symmetric(model, far, True),
                                  members.predict_symmetric(model, at_edge, True))
    unclipped = members.EstimatorMember("u", ["text"], clipped.prototype, clipped.target, {}, True, clip=False)
    free = members.fit_symmetric(unclipped.build({"C": 1.0}, 0), design, y, True)
    assert np.abs(members.predict_symmetric(free, far, True) - members.predict_symmetric(free, at_edge, True)).max() \
        > 0.01


def test_fallback_triggers_where_the_inner_splits_disagree_and_not_otherwise():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    inner = [(np.setdiff1d(np.arange(n), np.arange(i, n, 4)), np.arange(i, n, 4)) for i in range(4)]
    member = np.full((n, 3), 0.3)
    member[np.arange(n), y] = 0.4
    better = np.full((n, 3), 0.25)
    better[np.arange(n), y] = 0.5
    # The blend is better than the member on every inner split: no fallback.
    assert pooling.fallback(y, better, {"m": member}, inner, 0.02, 2.0) is None
    # Better on average, much worse on one inner split: the splits disagree, the member scores the fold.
    uneven = better.copy()
    uneven[inner[2][1]] = pooling.temper(np.roll(better[inner[2][1]], 1, axis=1), 0.5)
    assert pooling.row_losses(y, uneven).mean() > pooling.row_losses(y, better).mean()
    decided = pooling.fallback(y, uneven, {"m": member}, inner, 0.02, 2.0)
    assert decided is not None and decided.member == "m" and decided.split == 2 and "inner split 2" in decided.reason()
    assert pooling.fallback(y, uneven, {"m": member}, inner, None, 2.0) is None  # fallback_margin: null
    jittered = member * rng.uniform(0.5, 1.5, member.shape)  # per-row differences that vary: a split has noise
    jittered /= jittered.sum(axis=1, keepdims=True)
    assert pooling.fallback(y, uneven, {"m": jittered}, inner, 0.02, 2.0) is not None
    assert pooling.fallback(y, uneven, {"m": jittered}, inner, 0.02, 1e6) is None  # within that split's noise


def test_a_reduced_difference_changes_sign_under_an_a_b_swap():
    """fit_reducers fits each block's PCA on both orientations, so its centre is the swap's fixed point: the
    reduced response_a - response_b of the swapped pair is exactly minus the original's, even for data whose
    differences lean one way (a PCA fitted on one orientation would keep that lean as an offset)."""
    from pipeline.stage_two.features import PairInputs

    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, (40, 6)), rng.normal(0.0, 1.0, (40, 6))  # a's vectors lean positive
    pair = PairInputs(vectors={"h050_a_fwd": a, "h050_b_fwd": b})
    settings = {"layers": ["h050"], "kinds": ["diff"], "orientations": ["fwd"], "prefix": ""}
    reducers = design.fit_reducers(pair, np.arange(30), settings, 3, seed=0)
    built = design.design(pair, ["vectors"], settings, reducers)
    assert built.columns == ["h050_diff_0", "h050_diff_1", "h050_diff_2"]
    np.testing.assert_allclose(built.mirrored, -built.original, atol=1e-12)
    np.testing.assert_allclose(reducers["h050_diff"].mean_, 0, atol=1e-12)


def report_metrics() -> dict:
    return {"oof_logloss": 0.9, "accuracy": 0.55, "chosen": ["blend", "text"],
            "chosen_reason": ["the blend: no member beat it", "text beat the blend"],
            "baselines": {"prior": 1.05, "length": 0.95}, "baseline_accuracy": {"prior": 0.4, "length": 0.5},
            "members": {"head": 1.01, "text": 0.94}, "gain_over_best_baseline": 0.05,
            "per_fold": [0.88, 0.92], "baseline_per_fold": {"prior": [1.0, 1.1], "length": [0.9, 1.0]},
            "blend": [{"kind": "log_linear", "weights": {"head": 0.25, "text": 0.75}, "tie_bias": 0.1,
                       "temperatures": {"head": 1.0, "text": 1.0}},
                      {"kind": "linear", "weights": {"head": 0.5, "text": 0.3}, "prior_weight": 0.2,
                       "temperatures": {"head": 1.5, "text": 1.0}}],
            "inner_losses": [{"head": 1.0, "blend": 0.9}, {"head": 1.1, "blend": 0.95}],
            "params": [{"head": {}, "text": {"n_estimators": 40}}, {"head": {}, "text": {"n_estimators": 60}}]}


def test_the_report_tables_show_every_number_where_it_belongs():
    from pipeline.stage_two import report

    metrics = report_metrics()
    assert report.table(metrics).splitlines()[:6] == [
        "| model | OOF log loss | accuracy |", "|---|---|---|", "| stacker | 0.9000 | 0.550 |",
        "| prior | 1.0500 | 0.400 |", "| length | 0.9500 | 0.500 |", "| member: head | 1.0100 | |"]
    assert "gain over the best baseline (prior, length, head): +0.0500 log loss; chosen per fold: blend, text" in \
        report.table(metrics)
    folds = report.fold_table(metrics).splitlines()
    assert folds[0] == "| fold | stacker | prior | length | chosen | why | blend weights |"
    assert folds[2] == ("| 0 | 0.8800 | 1.0000 | 0.9000 | blend | the blend: no member beat it | log-linear: head 0.25, "
                        "text 0.75; tie bias 0.10 |")
    assert folds[3].endswith("| linear: head 0.50 (T 1.50), text 0.30, prior 0.20 |")
    assert report.inner_table(metrics).splitlines()[2:] == ["| 0 | 1.0000 | 0.9000 |", "| 1 | 1.1000 | 0.9500 |"]
    assert report.params_table(metrics).splitlines()[2:] == ["| 0 | — | n_estimators=40 |",
                                                             "| 1 | — | n_estimators=60 |"]
