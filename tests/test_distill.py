"""Teacher -> student (finetune.teacher, finetune/loss=distill): the loss, the targets each fold trains on, and the
leakage rule, proven by scrambling one fold's labels."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_OVERRIDES, compose_cfg
from pipeline import context, inputs, teachers
from pipeline.data import LABEL_COLUMNS
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.llm import training
from pipeline.llm.losses import TEACHER_PROBS, Distillation, HardLabelCrossEntropy
from pipeline.stages import all as all_stage, check, finetune, predict, stack


# ------------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("num_items", [None, 24])
def test_distillation_with_weight_one_on_the_hard_label_is_todays_loss_to_the_bit(label_smoothing, num_items):
    torch.manual_seed(0)
    logits = torch.randn(12, 3, requires_grad=True)
    targets = {"labels": torch.randint(0, 3, (12,)), TEACHER_PROBS: torch.softmax(torch.randn(12, 3), -1)}
    today = HardLabelCrossEntropy(label_smoothing)(logits, targets, num_items)
    distilled = Distillation(hard_label_weight=1, kl_weight=0, cosine_weight=0,
                             label_smoothing=label_smoothing)(logits, targets, num_items)
    assert torch.equal(today, distilled)
    grad_today, = torch.autograd.grad(today, logits)
    grad_distilled, = torch.autograd.grad(distilled, logits)
    assert torch.equal(grad_today, grad_distilled)


def test_distillation_terms_are_the_weighted_mean_of_ce_kl_and_cosine():
    torch.manual_seed(1)
    logits = torch.randn(8, 3)
    teacher = torch.softmax(torch.randn(8, 3), -1)
    labels = torch.randint(0, 3, (8,))
    targets = {"labels": labels, TEACHER_PROBS: teacher}
    t = 2.0
    ce = torch.nn.functional.cross_entropy(logits, labels)
    soft_teacher = torch.softmax(teacher.log() / t, -1)
    student_t = torch.log_softmax(logits / t, -1)
    kl = (soft_teacher * (soft_teacher.log() - student_t)).sum(-1).mean()
    cosine = torch.nn.functional.cosine_similarity(torch.softmax(logits, -1), teacher, dim=-1)
    expected = (0.5 * ce + 1.0 * t * t * kl + 2.0 * (1 - cosine).mean()) / 3.5
    loss = Distillation(hard_label_weight=0.5, kl_weight=1.0, cosine_weight=2.0, temperature=t)(logits, targets, None)
    assert torch.allclose(loss, expected, atol=1e-6)
    # A student that already says what the teacher says pays nothing for the soft terms.
    same = Distillation(hard_label_weight=0, kl_weight=1, cosine_weight=1)(teacher.log(), targets, None)
    assert abs(float(same)) < 1e-6


def test_pseudo_labelled_rows_train_only_through_the_teachers_probabilities():
    """Rows without a label (NO_LABEL) add nothing to the cross-entropy but weigh as much as any row in the batch
    mean; a batch of them alone is the soft terms only."""
    torch.manual_seed(2)
    logits = torch.randn(6, 3, requires_grad=True)
    teacher = torch.softmax(torch.randn(6, 3), -1)
    labels = torch.tensor([0, 1, -1, 2, -1, -1])
    loss = Distillation(hard_label_weight=1, kl_weight=0, cosine_weight=0)
    mixed = loss(logits, {"labels": labels, TEACHER_PROBS: teacher}, None)
    labelled = labels >= 0
    expected = torch.nn.functional.cross_entropy(logits[labelled], labels[labelled]) * 3 / 6
    assert torch.allclose(mixed, expected)
    soft_only = Distillation(hard_label_weight=0.5, kl_weight=1, cosine_weight=1)
    unlabelled = soft_only(logits, {"labels": torch.full((6,), -1), TEACHER_PROBS: teacher}, None)
    no_hard = Distillation(hard_label_weight=0, kl_weight=1, cosine_weight=1)
    assert torch.allclose(unlabelled * 2.5, no_hard(logits, {"labels": labels, TEACHER_PROBS: teacher}, None) * 2)
    torch.autograd.grad(unlabelled, logits)  # differentiable with no label in the batch


@pytest.mark.parametrize("settings", [{"hard_label_weight": -1}, {"kl_weight": 0, "cosine_weight": 0,
                                                                   "hard_label_weight": 0}, {"temperature": 0}])
def test_distillation_refuses_weights_or_temperatures_that_mean_nothing(settings):
    with pytest.raises(ValueError):
        Distillation(**settings)


def test_swapped_training_rows_carry_the_mirrored_teacher_probabilities():
    """Under swap augmentation a row's A/B-swapped copy trains on the teacher's probabilities mirrored (a <-> b)."""
    encoded = [type("E", (), {"input_ids": [i, i + 1]})() for i in range(3)]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    rows = training.training_rows(encoded, encoded, np.array([0, 1, 2]), np.array([0, 2]), True, probs)
    assert [r[TEACHER_PROBS] for r in rows] == [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]
    assert [r["labels"] for r in rows] == [0, 2, 1, 2]


# ------------------------------------------------------------------------------------------- teacher and student
def run_teacher(out: Path, cache: Path, name: str, *overrides: str, stage: str = "finetune"):
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={cache}",
                       f"exp_name={name}", "finetune.learning_rate=5e-3", *overrides])
    (finetune if stage == "finetune" else all_stage).run(cfg)
    return cfg


def student_cfg(out: Path, cache: Path, name: str, teacher: Path, *overrides: str):
    return compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={cache}",
                        f"exp_name={name}", "finetune/loss=distill", f"finetune.teacher={teacher}",
                        "finetune.learning_rate=5e-3", *overrides])


@pytest.fixture(scope="module")
def llm_teacher(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("distill")
    cfg = run_teacher(out, model_cache, "teacher")
    return out, Path(cfg.paths.exp_dir)


def test_soft_targets_are_the_teachers_in_fold_probabilities_of_the_right_fold(llm_teacher, model_cache,
                                                                               monkeypatch):
    """Student fold k trains on teacher fold k's in-fold pass over exactly the rows it trains on, and the
    Trainer receives those targets; no target is made for fold k's own rows, and none is the teacher's OOF."""
    out, teacher = llm_teacher
    cfg = student_cfg(out, model_cache, "student_targets", teacher)
    ctx = context.open_run(cfg, "test")
    targets = teachers.load(ctx, [0, 1, 2])
    lay = Layout(teacher)
    teacher_oof = pd.read_parquet(lay.finetune_oof).set_index("id")
    for k in range(3):
        train = ctx.fold_of != k
        assert np.isnan(targets.by_fold[k][~train]).all()
        in_fold = list(lay.finetune_fold(k).glob("infold_*.parquet"))
        assert len(in_fold) == 1
        kept = pd.read_parquet(in_fold[0]).set_index("id")
        assert sorted(kept.index) == sorted(ctx.ids[train])  # the teacher fold's training rows, no other
        np.testing.assert_array_equal(targets.by_fold[k][train], kept.loc[ctx.ids[train], list(LABEL_COLUMNS)])
        assert not np.allclose(targets.by_fold[k][train], teacher_oof.loc[ctx.ids[train], list(LABEL_COLUMNS)])

    seen = {}

    def record(cfg_, on, dtype, source, tokenizer, rows, seed, *rest, **kwargs):
        seen[seed - int(cfg_.seed)] = rows
        return real(cfg_, on, dtype, source, tokenizer, rows, seed, *rest, **kwargs)

    real = training.train_adapter
    monkeypatch.setattr(training, "train_adapter", record)
    finetune.run(cfg)
    for k, rows in seen.items():
        expected = targets.by_fold[k][ctx.fold_of != k]
        got = np.array([r[TEACHER_PROBS] for r in rows[: len(expected)]])
        np.testing.assert_array_equal(got, expected)


def unlabeled_file(cfg, target: Path) -> Path:
    """The demo test rows that are not pairs of the demo train file: rows a teacher may label for the student."""
    from pipeline.data import load_pairs, shared_pairs

    paths = inputs.data_paths(cfg)
    train, test = load_pairs(paths.train, with_labels=True).frame, load_pairs(paths.test, with_labels=False).frame
    raw = pd.read_csv(paths.test, dtype=str, keep_default_na=False)
    raw[~raw["id"].isin(shared_pairs(test, train))].to_csv(target, index=False)
    return target


def test_pseudo_labels_join_each_fold_with_that_folds_teacher_targets_and_are_never_scored(llm_teacher, model_cache,
                                                                                            monkeypatch):
    out, teacher = llm_teacher
    demo = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}"])
    unlabeled = unlabeled_file(demo, out / "unlabeled.csv")
    n_unlabeled = len(pd.read_csv(unlabeled))
    cfg = student_cfg(out, model_cache, "student_pseudo", teacher, f"data.unlabeled={unlabeled}")
    checked = check.run(cfg)
    assert checked["unlabeled"]["n_rows"] == n_unlabeled
    assert checked["unlabeled"]["rows_in_test"] == n_unlabeled  # they are demo test rows: said, not refused
    seen = {}
    real = training.train_adapter

    def record(cfg_, on, dtype, source, tokenizer, rows, seed, *rest, **kwargs):
        seen[seed - int(cfg_.seed)] = rows
        return real(cfg_, on, dtype, source, tokenizer, rows, seed, *rest, **kwargs)

    monkeypatch.setattr(training, "train_adapter", record)
    finetune.run(cfg)
    ids = pd.read_csv(unlabeled, dtype=str)["id"]
    for k, rows in seen.items():
        pseudo = [r for r in rows if r["labels"] == -1]
        assert len(pseudo) == n_unlabeled * (2 if cfg.finetune.swap_augmentation else 1)
        kept = pd.read_parquet(next(Layout(teacher).finetune_fold(k).glob("unlabeled_*.parquet"))).set_index("id")
        np.testing.assert_array_equal(np.array([r[TEACHER_PROBS] for r in pseudo[:n_unlabeled]]),
                                      kept.loc[ids, list(LABEL_COLUMNS)].to_numpy())
    exp = Path(cfg.paths.exp_dir)
    oof = pd.read_parquet(Layout(exp).finetune_oof)
    assert not set(oof["id"]) & set(ids)
    assert len(oof) == len(pd.read_csv(inputs.data_paths(cfg).train))


def test_unlabeled_rows_that_repeat_train_rows_are_refused(llm_teacher, model_cache, tmp_path):
    out, teacher = llm_teacher
    demo = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}"])
    train = pd.read_csv(inputs.data_paths(demo).train, dtype=str, keep_default_na=False)
    copy = train.head(2).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    copy.assign(id="copy-" + copy["id"]).to_csv(tmp_path / "copies.csv", index=False)
    copy.to_csv(tmp_path / "same_ids.csv", index=False)
    for name, message in (("copies.csv", "pairs of data.train under other ids"), ("same_ids.csv", "ids also in")):
        with pytest.raises(UserError, match=message):
            check.run(student_cfg(out, model_cache, "student_copies", teacher, f"data.unlabeled={tmp_path / name}"))


def scrambled_copy(train: Path, fold_of: np.ndarray, k: int, target: Path, seed: int = 0) -> Path:
    """The train file with fold k's labels permuted among fold k's rows (every other row as it was)."""
    frame = pd.read_csv(train, dtype=str, keep_default_na=False)
    rows = np.flatnonzero(fold_of == k)
    order = np.random.default_rng(seed).permutation(rows)
    winners = ["winner_model_a", "winner_model_b", "winner_tie"]
    frame.loc[rows, winners] = frame.loc[order, winners].to_numpy()
    assert (frame[winners] != pd.read_csv(train, dtype=str, keep_default_na=False)[winners]).any(axis=None)
    frame.to_csv(target, index=False)
    return target


def fold_oof(exp: Path, k: int) -> pd.DataFrame:
    return pd.read_parquet(Layout(exp).fold_oof(k))


@pytest.mark.parametrize("kind", ["llm", "stage_two"])
def test_scrambling_fold_k_labels_in_teacher_and_student_leaves_the_students_fold_k_oof_bit_identical(
        tmp_path, model_cache, kind):
    """The leakage rule, end to end: permuting fold 0's labels (in the teacher's and the student's train file)
    cannot change anything student fold 0 learned (pseudo-labelled rows included) or scored. The folds of the scrambled runs are the original ones
    (copied in), so only the labels differ. Fold 1 of the student does change: the scramble was seen elsewhere."""
    teacher_overrides = ["finetune.train=false", "finetune.head_init=verdict_tokens"] if kind == "stage_two" else []
    stage = "all" if kind == "stage_two" else "finetune"

    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}"])
    unlabeled = unlabeled_file(cfg, tmp_path / "unlabeled.csv")

    def teacher_and_student(tag: str, train: Path | None, folds: Path | None) -> Path:
        data = [f"data.train={train}"] if train else []
        for name in (f"teacher_{tag}", f"student_{tag}"):
            if folds is not None:
                (tmp_path / name).mkdir()
                shutil.copy(folds, tmp_path / name / "folds.parquet")
        cfg = run_teacher(tmp_path, model_cache, f"teacher_{tag}", *teacher_overrides, *data, stage=stage)
        teacher = Path(cfg.paths.exp_dir) / ("stack" if kind == "stage_two" else "")
        student = student_cfg(tmp_path, model_cache, f"student_{tag}", teacher, *data, f"data.unlabeled={unlabeled}")
        finetune.run(student)
        return Path(student.paths.exp_dir)

    original = teacher_and_student("original", None, None)
    folds = pd.read_parquet(original / "folds.parquet")
    train = scrambled_copy(inputs.data_paths(cfg).train, folds["fold"].to_numpy(), 0, tmp_path / "scrambled.csv")
    scrambled = teacher_and_student("scrambled", train, original / "folds.parquet")

    pd.testing.assert_frame_equal(fold_oof(original, 0), fold_oof(scrambled, 0), check_exact=True)
    assert not fold_oof(original, 1).equals(fold_oof(scrambled, 1))


def test_a_teacher_with_other_folds_or_other_rows_is_refused(llm_teacher, model_cache, tmp_path):
    out, teacher = llm_teacher
    for overrides, message in ((["seed=7"], "folds differ"), (["cv.n_folds=2"], "folds differ")):
        cfg = student_cfg(out, model_cache, f"student_{overrides[0].replace('=', '')}", teacher, *overrides)
        with pytest.raises(UserError, match=message):
            check.run(cfg)
    demo = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}"])
    frame = pd.read_csv(inputs.data_paths(demo).train, dtype=str, keep_default_na=False)
    changed = frame.copy()
    changed.loc[0, "response_a"] = '["another answer"]'
    changed.to_csv(tmp_path / "changed.csv", index=False)
    with pytest.raises(UserError, match="differ from the teacher's rows"):
        check.run(student_cfg(out, model_cache, "student_changed", teacher, f"data.train={tmp_path / 'changed.csv'}"))
    frame.assign(id="new-" + frame["id"]).to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(UserError, match="not among the teacher's"):
        check.run(student_cfg(out, model_cache, "student_renamed", teacher, f"data.train={tmp_path / 'renamed.csv'}"))


def test_a_frozen_experiment_with_a_random_head_is_refused_as_an_llm_teacher(tmp_path, model_cache):
    """A frozen experiment's fold adapters (finetune.train=false) with a random head teach noise: refused at check,
    pointing at its stage two; with a zero-shot head (finetune.head_init=verdict_tokens) they may teach."""
    for name, head in (("frozen_random", "random"), ("frozen_zero_shot", "verdict_tokens")):
        run_teacher(tmp_path, model_cache, name, "finetune.train=false", f"finetune.head_init={head}")
    with pytest.raises(UserError, match=r"never trained .* random start .*frozen_random/stack"):
        check.run(student_cfg(tmp_path, model_cache, "student_random", tmp_path / "frozen_random"))
    found = check.run(student_cfg(tmp_path, model_cache, "student_zero_shot", tmp_path / "frozen_zero_shot"))
    assert [t["kind"] for t in found["teachers"]] == ["llm"]


def test_a_fine_tuned_experiments_stage_two_is_refused_as_a_teacher(tiny_experiment, model_cache, tmp_path):
    _, exp, _ = tiny_experiment
    cfg = student_cfg(tmp_path, model_cache, "student", exp / "stack")
    with pytest.raises(UserError, match="reads fine-tuned features"):
        check.run(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["finetune/loss=distill"], "set finetune.teacher"),
    (["finetune.teacher=PATH"], "add finetune/loss=distill"),
    (["finetune/loss=distill", "finetune.teacher=PATH", "finetune.train=false"], "frozen-feature path"),
    (["finetune/loss=distill", "finetune.teacher=PATH", "stage=fit"], "a full-data fit has no folds"),
    (["finetune/loss=distill", "finetune.teacher=/nowhere"], "not a finished experiment"),
])
def test_teacher_settings_that_cannot_work_fail_at_check(llm_teacher, model_cache, overrides, message):
    from pipeline import validation

    out, teacher = llm_teacher
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}",
                       *[o.replace("PATH", str(teacher)) for o in overrides]])
    with pytest.raises(UserError, match=message):
        validation.validate(cfg)


def test_a_finished_student_needs_its_teacher_no_more(tmp_path, model_cache):
    """Once its folds are trained, a student's stack, predict, Predictor and export run with the teacher gone (the
    export scores as the experiment does)."""
    from pipeline.predictor import Predictor

    teacher_cfg = run_teacher(tmp_path, model_cache, "teacher")
    teacher = Path(teacher_cfg.paths.exp_dir)
    cfg = student_cfg(tmp_path, model_cache, "student", teacher)
    metrics = all_stage.run(cfg)
    assert metrics["check"]["teachers"] == [{"path": str(teacher), "kind": "llm", "model": "tiny-llama"}]
    assert len(metrics["finetune"]["teacher_target_logloss"]) == 3
    shutil.rmtree(teacher)
    stack.run(cfg)
    predict.run(compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}",
                             "exp_name=student", "finetune/loss=distill", "finetune.learning_rate=5e-3",
                             f"finetune.teacher={teacher}", "stage=predict"]))
    rows = pd.read_csv(inputs.data_paths(cfg).test).head(3)
    probs = Predictor.load(Path(cfg.paths.exp_dir)).predict_proba(rows)
    assert probs.shape == (3, 3)
    from pipeline.stages import export

    export.run(compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}",
                            "exp_name=student", "finetune/loss=distill", "finetune.learning_rate=5e-3",
                            f"finetune.teacher={teacher}", "stage=export", f"export.dir={tmp_path / 'export'}"]))
    np.testing.assert_array_equal(Predictor.load(tmp_path / "export").predict_proba(rows), probs)


# ------------------------------------------------------------------------------------------ a privileged teacher
def test_model_names_go_into_the_markers_outside_the_spans_and_follow_a_swap():
    from pipeline.formatting import encode_pairs

    tokenize = lambda texts: [[ord(c) for c in t] for t in texts]  # noqa: E731  (one id per character)
    plain, = encode_pairs(tokenize, [["q"]], [["aa"]], [["bbb"]], 400, 0.3, "left")
    named, = encode_pairs(tokenize, [["q"]], [["aa"]], [["bbb"]], 400, 0.3, "left",
                          model_names=(["gpt-x"], ["llama-y"]))
    text = "".join(map(chr, named.input_ids))
    assert "Response A (by gpt-x)" in text and "Response B (by llama-y)" in text
    assert "".join(map(chr, named.input_ids[slice(*named.span_a)])) == "aa"
    assert "".join(map(chr, named.input_ids[slice(*named.span_b)])) == "bbb"
    assert "gpt-x" not in "".join(map(chr, plain.input_ids))


def test_a_teacher_shown_model_names_teaches_a_student_that_never_sees_them(tmp_path, model_cache, monkeypatch):
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}"])
    train = tmp_path / "named.csv"
    shutil.copy(inputs.data_paths(cfg).train, train)  # the demo train file names each row's models; no test file
    named = ["model.show_model_names=true", "model.max_length=256"]  # byte-level tokens: names take room
    teacher = Path(run_teacher(tmp_path, model_cache, "named_teacher", *named, f"data.train={train}",
                               stage="all").paths.exp_dir)
    trained_on = []
    real = training.train_adapter
    monkeypatch.setattr(training, "train_adapter", lambda cfg_, on, dtype, source, tokenizer, rows, *rest, **kwargs:
                        trained_on.append((tokenizer, rows)) or real(cfg_, on, dtype, source, tokenizer, rows, *rest,
                                                                     **kwargs))
    student = student_cfg(tmp_path, model_cache, "student", teacher, f"data.train={train}")
    finetune.run(student)
    teacher_files = list(Path(teacher).glob("finetune/fold_*/infold_*.parquet"))
    assert len(teacher_files) == 3  # the teacher scored its rows with the names
    texts = [tokenizer.decode(r["input_ids"]) for tokenizer, rows in trained_on for r in rows]
    assert len(trained_on) == 3 and all("Response A\n" in t and "(by demo-model" not in t for t in texts)
    with pytest.raises(UserError, match="student never sees the model names"):
        check.run(student_cfg(tmp_path, model_cache, "student_named", teacher, f"data.train={train}",
                              *named))
    test = inputs.data_paths(cfg).test  # the demo test file has no model names
    with pytest.raises(UserError, match="model.show_model_names=true"):
        predict.run(compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={tmp_path}",
                                 f"paths.model_cache_dir={model_cache}", "exp_name=named_teacher",
                                 *named, "finetune.learning_rate=5e-3", f"data.train={train}",
                                 f"data.test={test}", "stage=predict"]))


# ------------------------------------------------------------------------------------------ labelling at scale
def test_ray_labelling_with_two_cpu_workers_gives_the_in_process_probabilities(llm_teacher, model_cache, tmp_path):
    """finetune.teacher_workers: the rows streamed through a local Ray Data pipeline of two CPU actors come back
    with the probabilities one in-process pass gives (fp32: only the batches' padding differs), in row order."""
    ray = pytest.importorskip("ray")
    from pipeline import ray_labelling

    out, teacher = llm_teacher
    student = student_cfg(out, model_cache, "student_ray", teacher)
    ctx = context.open_run(student, "test")
    data = teachers.resolve(teacher).data(str(model_cache))
    data.cfg.model.precision = "fp32"
    args = teachers.FoldScorer.arguments(data.cfg, Layout(teacher).adapter(1), 4096)
    frame = ctx.train.frame[ctx.fold_of != 1]
    alone = teachers.FoldScorer(**args)(frame)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spread = ray_labelling.score(frame, teachers.FoldScorer, args, workers=2, batch_rows=16)
    finally:
        ray.shutdown()
    assert list(spread["id"]) == list(alone["id"])
    np.testing.assert_allclose(spread[list(LABEL_COLUMNS)], alone[list(LABEL_COLUMNS)], rtol=0, atol=1e-5)


def test_extra_rows_no_teacher_labelled_train_on_their_own_label(tiny_cfg):
    """data.extra rows beside a teacher carry their label one-hot as the soft target (the KL term is then their
    cross-entropy), mirrored in their swapped copies."""
    from pipeline.data import load_pairs
    from pipeline.llm import modeling

    cfg = tiny_cfg()
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame.head(5)
    tokenizer = modeling.load_tokenizer(modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir), cfg.model)
    rows = training.all_training_rows(tokenizer, frame, cfg.model, True, label_targets=True)
    labels = frame["label"].to_numpy()
    assert [r[TEACHER_PROBS] for r in rows[:5]] == np.eye(3)[labels].tolist()
    assert [r[TEACHER_PROBS] for r in rows[5:]] == np.eye(3)[[{0: 1, 1: 0, 2: 2}[y] for y in labels]].tolist()
    assert all(TEACHER_PROBS not in r for r in training.all_training_rows(tokenizer, frame, cfg.model, False))


@pytest.mark.parametrize(("n_folds", "group_of_fold", "refused"), [
    (3, [0, 1, 2], True),             # leave one source out with three sources: one source per nested stacker
    (4, [0, 1, 2, 3], False),         # four sources: two left for each nested stacker
    (3, [0, 0, 1], False),            # many groups per fold (cv.group_by=prompt): always splittable
    (2, [0, 1], True),                # two folds: a nested stacker would have no rows at all
])
def test_a_stage_two_teacher_whose_nested_stackers_cannot_split_is_refused(n_folds, group_of_fold, refused):
    """A stage-two teacher's targets for fold k come from stackers fitted on K-2 folds: where those rows hold one
    group of cv.group_by (or none), nothing could be chosen on an inner split, so the teacher is refused with a
    message that says why (stage=check and the fine-tune's setup call this before any target is made)."""
    from types import SimpleNamespace

    fold_of = np.repeat(np.arange(n_folds), 6)
    # Row i's group: its fold's source, or (for [0, 0, 1]) one group per row beside the source.
    groups = np.array([f"{group_of_fold[f]}-{i if group_of_fold == [0, 0, 1] else ''}" for i, f in enumerate(fold_of)])
    ctx = SimpleNamespace(n_folds=n_folds, fold_of=fold_of, groups=groups,
                          cfg=SimpleNamespace(cv=SimpleNamespace(group_by="source")))
    teacher = teachers.StageTwoTeacher(Path("outputs/frozen/stack"), Path("outputs/frozen"))
    if refused:
        with pytest.raises(UserError, match="finetune.teacher=outputs/frozen/stack: its targets for fold 0 come "
                                            "from stage two cross-fitted within the other folds"):
            teacher.check_folds(None, ctx)
    else:
        teacher.check_folds(None, ctx)
    assert teachers.LLMTeacher(Path("outputs/tuned"), Path("outputs/tuned")).check_folds(None, ctx) is None
