"""Teacher targets for a distilled fine-tune (`finetune.teacher`, with `finetune/loss=distill`).

The leakage rule: every target that trains student fold k comes from teacher models that never saw fold k's
labels, so the student's fold-k OOF (and the stage two fitted on it) is what new prompts would get.

- An LLM teacher (`finetune.teacher=outputs/NAME`: a finished fine-tune of any model and tokenizer): teacher fold k's
  adapter, trained on the folds other than k, scores those same rows (the in-fold pass, run once when first needed
  and kept in the teacher's folder as finetune/fold_k/infold_<key>.parquet). Not the teacher's OOF: a row of fold j
  got its OOF from teacher fold j's adapter, which trained on fold k's labels.
- A stage-two teacher (`outputs/NAME/stack`): stage two cross-fitted within the folds other than k
  (stage_two.cv.nested_oof), kept as stack/nested_fold_k_<key>.parquet. Its features must carry no label, which only
  a frozen-path experiment's (finetune.train=false) do: a fine-tuned experiment's OOF features of fold j come from an
  adapter that trained on fold k, so its stage two is refused as a teacher (the experiment itself is a leak-free
  LLM teacher).

Teacher and student share folds: every student row is a teacher row with the same prompt and responses and the same
fold (checked; refused otherwise). Several teachers are averaged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, folds, inputs, layout, setups
from pipeline.context import RunContext
from pipeline.data import LABEL_COLUMNS, load_pairs, pair_keys
from pipeline.errors import UserError
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def teacher_paths(ft: DictConfig) -> list[Path]:
    """finetune.teacher as a list of paths ([] without a teacher)."""
    value = ft.get("teacher")
    if value is None:
        return []
    return [Path(str(p)) for p in ([value] if isinstance(value, str) else list(value))]


@dataclass
class TeacherData:
    """A teacher experiment's recorded config, train rows and folds."""

    cfg: DictConfig
    frame: pd.DataFrame
    fold_of: np.ndarray

    @property
    def ids(self) -> np.ndarray:
        return self.frame["id"].to_numpy().astype(str)


class Teacher:
    """One teacher behind one interface: `fingerprint()` names what it is made of (a retrained teacher changes it),
    `fold_targets(k)` gives its probabilities for its rows of the folds other than k and `unlabeled_targets(k)` for
    data.unlabeled's rows, both from models that never saw fold k's labels (id + the three probability columns)."""

    kind = ""

    def __init__(self, path: Path, exp: Path):
        self.path, self.exp = path, exp

    def fingerprint(self) -> str:
        return setups.teacher_fingerprint(self.path)

    def data(self, model_cache_dir: str) -> TeacherData:
        raise NotImplementedError

    def fold_targets(self, k: int, data: TeacherData, student_cfg: DictConfig) -> pd.DataFrame:
        raise NotImplementedError

    def unlabeled_targets(self, k: int, data: TeacherData, unlabeled: inputs.Unlabeled,
                          student_cfg: DictConfig) -> pd.DataFrame:
        raise NotImplementedError

    def check_folds(self, data: TeacherData, ctx: RunContext) -> None:
        """Refuse, before any target is made, folds this teacher cannot make leak-free targets for (nothing to
        refuse by default)."""

    def release(self) -> None:
        """Free what the teacher held while making targets (a loaded model)."""

    def cached(self, file: Path, compute) -> pd.DataFrame:
        """The targets kept at `file` (its name carries what they depend on), computed and kept on first use."""
        if file.is_file():
            return artifacts.read_parquet(file, f"delete {file}; it is recomputed from the teacher")
        frame = compute()
        try:
            artifacts.write_parquet(file, frame)
        except OSError as exc:  # a read-only teacher still teaches; only the reuse is lost
            log.warning("finetune.teacher: cannot keep %s (%s); it is recomputed next time", file, exc)
        return frame


def recorded_config(exp: Path, stage: str, model_cache_dir: str) -> DictConfig:
    """The config a teacher experiment's `stage` ran with (its manifest), pointed at where its folder is now and at
    this machine's model cache."""
    manifest = Layout(exp).manifest(stage)
    try:
        cfg = setups.with_added_settings(OmegaConf.create(artifacts.read_json(manifest)["config"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"finetune.teacher={exp}: {manifest} is missing or damaged; a teacher is a finished "
                        f"experiment of this pipeline (run its stage={stage} first)") from None
    cfg.paths.exp_dir, cfg.paths.output_dir, cfg.exp_name = str(exp), str(exp.parent), exp.name
    cfg.paths.model_cache_dir = model_cache_dir
    cfg.data.test = None
    return cfg


def teacher_frame(cfg: DictConfig, exp: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A teacher's train rows and their folds (its folds.parquet, in train-file order)."""
    train = inputs.data_paths(cfg).train
    if not Path(train).is_file():
        raise UserError(f"finetune.teacher={exp}: its train file {train} is not found; the student's rows are "
                        "matched against it")
    frame = load_pairs(train, with_labels=True).frame
    fold_table = folds.load_or_create(exp, frame, cfg.cv.n_folds, cfg.seed, cfg.cv.group_by)
    return frame, fold_table["fold"].to_numpy()


class LLMTeacher(Teacher):
    """A finished fine-tune: fold k's adapter scores its own training rows (the in-fold pass)."""

    kind = "llm"
    _scorer: tuple[int, "FoldScorer"] | None = None

    def data(self, model_cache_dir: str) -> TeacherData:
        cfg = recorded_config(self.exp, "finetune", model_cache_dir)
        ft = cfg.finetune
        random_head = ft.get("head_init", "random") == "random" and not ft.get("init_adapter")
        if not ft.train and random_head:
            # Its probabilities come from a randomly initialised head over the base model (3.3 log loss on the bench
            # sample): targets that teach noise.
            raise UserError(f"finetune.teacher={self.path}: its folds were never trained (finetune.train=false) and "
                            "their head is a random start (finetune.head_init=random), so their probabilities say "
                            f"nothing about the verdict; teach with its stage two (finetune.teacher={self.path}/stack), "
                            "a fine-tuned experiment, or a frozen one made with finetune.head_init=verdict_tokens")
        lay = Layout(self.exp)
        pending = [k for k in range(int(cfg.cv.n_folds))
                   if not (artifacts.read_state(lay.finetune_fold(k)) or {}).get(layout.DONE)]
        if pending:
            raise UserError(f"finetune.teacher={self.path}: folds {pending} are not finished; finish the teacher's "
                            "stage=finetune first")
        return TeacherData(cfg, *teacher_frame(cfg, self.exp))

    def pass_key(self, k: int, data: TeacherData, rows_file: Path | None = None) -> str:
        """What a pass of fold k's adapter depends on: its weights, the scoring settings, the rows' file (the
        teacher's own rows when None)."""
        adapter = Layout(self.exp).adapter(k) / "adapter_model.safetensors"
        return artifacts.config_hash({"adapter": artifacts.file_fingerprint(adapter),
                                      "embed": {name: data.cfg.embed[name] for name in ("max_length", "swap_tta")},
                                      **({"rows": artifacts.file_fingerprint(rows_file)} if rows_file else {})})

    def fold_targets(self, k: int, data: TeacherData, student_cfg: DictConfig) -> pd.DataFrame:
        index = np.flatnonzero(data.fold_of != k)
        return self.cached(Layout(self.exp).finetune_fold(k) / f"infold_{self.pass_key(k, data)}.parquet",
                           lambda: self.fold_pass(k, data, data.frame.iloc[index], student_cfg, "training rows"))

    def unlabeled_targets(self, k: int, data: TeacherData, unlabeled: inputs.Unlabeled,
                          student_cfg: DictConfig) -> pd.DataFrame:
        key = self.pass_key(k, data, unlabeled.path)
        return self.cached(Layout(self.exp).finetune_fold(k) / f"unlabeled_{key}.parquet",
                           lambda: self.fold_pass(k, data, unlabeled.data.frame, student_cfg, "unlabeled rows"))

    def fold_pass(self, k: int, data: TeacherData, frame: pd.DataFrame, student_cfg: DictConfig,
                  what: str) -> pd.DataFrame:
        """Teacher fold k's adapter over `frame` (its own training rows: the in-fold pass; or unlabeled rows): in
        this process, or with finetune.teacher_workers=N by N Ray Data workers (pipeline/ray_labelling.py), each a
        FoldScorer like the one used here."""
        workers = int(student_cfg.finetune.get("teacher_workers") or 0)
        scorer_args = FoldScorer.arguments(data.cfg, Layout(self.exp).adapter(k), student_cfg.embed.batch_tokens)
        log.info("finetune.teacher: %s fold %d scores %d %s (once%s)", self.path, k, len(frame), what,
                 f", {workers} Ray workers" if workers else "")
        if workers:
            from pipeline import ray_labelling

            return ray_labelling.score(frame, FoldScorer, scorer_args, workers)
        if self._scorer is None or self._scorer[0] != k:  # one load per fold: its training and unlabeled rows
            self.release()
            self._scorer = (k, FoldScorer(**scorer_args))
        return self._scorer[1](frame)

    def release(self) -> None:
        if self._scorer is not None:
            self._scorer[1].release()
            self._scorer = None


class FoldScorer:
    """One teacher fold's adapter, loaded once, scoring batches of rows with the teacher's own model, formatting and
    scoring length (head probabilities; both orientations with its swap TTA): the in-process pass, and the actor
    each Ray worker holds. Built from plain, picklable arguments (`arguments`)."""

    def __init__(self, config: dict, adapter: str, batch_tokens: int):
        from pipeline import embed_passes
        from pipeline.llm import modeling

        self.cfg = cfg = OmegaConf.create(config)
        on = modeling.device()
        dtype = modeling.compute_dtype(cfg.model.precision, on)
        source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
        self.tokenizer = modeling.load_tokenizer(source, cfg.model)
        self.model = modeling.load_with_adapter(source, cfg.model, self.tokenizer, Path(adapter), dtype, on)
        # Only the head is read: no vectors kept beyond the last layer, no LM-head or base-model passes.
        embed = OmegaConf.merge(cfg.embed, {"layers": [1.0], "lm_features": False, "base_vectors": False,
                                            "batch_tokens": batch_tokens})
        self.settings = embed_passes.PassSettings(self.tokenizer.pad_token_id, embed, on, dtype, source)

    @staticmethod
    def arguments(cfg: DictConfig, adapter: Path, batch_tokens: int) -> dict:
        return {"config": OmegaConf.to_container(cfg, resolve=True), "adapter": str(adapter),
                "batch_tokens": int(batch_tokens)}

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        from pipeline import embed_passes

        rows = embed_passes.encode_rows(self.tokenizer, frame, self.cfg)
        probs = embed_passes.pass_features(self.model, rows, self.settings, desc="teacher").head_probabilities()
        return pd.DataFrame({"id": frame["id"].to_numpy().astype(str), **dict(zip(LABEL_COLUMNS, probs.T))})

    def release(self) -> None:
        """Free the model (and its GPU memory) before the student's loads."""
        import torch

        del self.model
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()


class StageTwoTeacher(Teacher):
    """A frozen-path experiment's stage two, cross-fitted within the training folds of each student fold."""

    kind = "stage_two"

    def __init__(self, path: Path, exp: Path):
        super().__init__(path, exp)
        self._stack_data: dict[Path | None, tuple] = {}

    def data(self, model_cache_dir: str) -> TeacherData:
        from pipeline.predictor import recorded_experiment_config

        cfg = recorded_experiment_config(self.exp)
        cfg.paths.model_cache_dir = model_cache_dir
        if cfg.finetune.train:
            raise UserError(f"finetune.teacher={self.path}: this stage two reads fine-tuned features (an OOF row of "
                            "fold j comes from an adapter trained on the other folds' labels), so no target of it is "
                            f"free of fold k's labels; use the experiment itself (finetune.teacher={self.exp}: its "
                            "fold adapters) or the stage two of a frozen-path experiment (finetune.train=false)")
        return TeacherData(cfg, *teacher_frame(cfg, self.exp))

    def fold_targets(self, k: int, data: TeacherData, student_cfg: DictConfig) -> pd.DataFrame:
        return self.cached(Layout(self.exp).stack / f"nested_fold_{k}_{self.fingerprint()}.parquet",
                           lambda: self.nested(k, data))

    def unlabeled_targets(self, k: int, data: TeacherData, unlabeled: inputs.Unlabeled,
                          student_cfg: DictConfig) -> pd.DataFrame:
        key = artifacts.config_hash([self.fingerprint(), artifacts.file_fingerprint(unlabeled.path)])
        return self.cached(Layout(self.exp).stack / f"unlabeled_fold_{k}_{key}.parquet",
                           lambda: self.fitted_on_training_folds(k, data, unlabeled))

    def stack_data(self, data: TeacherData, unlabeled: inputs.Unlabeled | None = None):
        """The teacher's stage-two inputs (and, with `unlabeled`, those rows' as its test rows: their features are
        extracted once by the teacher's own passes and kept in its embed folder), read once for every fold."""
        key = None if unlabeled is None else unlabeled.path
        if key not in self._stack_data:
            self._stack_data[key] = self.read_stack_data(data, unlabeled)
        return self._stack_data[key]

    def read_stack_data(self, data: TeacherData, unlabeled: inputs.Unlabeled | None):
        from pipeline import context, embed_passes, feature_table
        from pipeline.stage_two import cv
        from pipeline.stage_two.design import stacker_inputs
        from pipeline.stage_two.spec import StackSpec

        cfg = data.cfg.copy()
        cfg.data.test = None if unlabeled is None else str(unlabeled.path)
        spec = StackSpec.from_config(cfg.stack, cfg.seed)
        # Nothing recorded in the teacher's folder but the unlabeled rows' features, kept in its embed folder.
        ctx = context.open_run(cfg, "teacher", record=False)
        state = feature_table.finetune_fold_states(ctx)[0]
        features = feature_table.oof_features(ctx, state)
        test = None
        if unlabeled is not None:
            embed_passes.ensure_test_features(ctx)
            test = stacker_inputs(ctx.test.frame, feature_table.test_features(ctx, state))
        return spec, ctx, cv.StackData(stacker_inputs(ctx.train.frame, features), ctx.labels, ctx.fold_of, ctx.groups,
                                       spec.vectors.settings(features.vectors), test, str(cfg.cv.group_by))

    def check_folds(self, data: TeacherData, ctx: RunContext) -> None:
        """Student fold k's targets come from stage two cross-fitted within fold k's training folds: each nested
        stacker is fitted on the K-2 folds left, whose rows must hold two groups (cv.group_by) for an inner split.
        With cv.group_by=source and three sources one is left: refused at stage=check, before any target."""
        groups = ctx.groups
        for k in range(ctx.n_folds):
            for j in (j for j in range(ctx.n_folds) if j != k):
                rows = (ctx.fold_of != k) & (ctx.fold_of != j)
                n_groups = len(np.unique(groups[rows]))
                if n_groups < 2:
                    raise UserError(
                        f"finetune.teacher={self.path}: its targets for fold {k} come from stage two cross-fitted "
                        f"within the other folds (no label of fold {k} reaches them), so each nested stacker is "
                        f"fitted on {ctx.n_folds - 2} fold(s): {int(rows.sum())} rows in {n_groups} group(s) of "
                        f"cv.group_by={ctx.cfg.cv.group_by}, nothing to choose on an inner split; raise cv.n_folds, "
                        "use another cv.group_by, or teach with a fine-tuned experiment's fold adapters "
                        "(finetune.teacher=outputs/NAME)")

    def nested(self, k: int, data: TeacherData) -> pd.DataFrame:
        from pipeline.stage_two import cv

        spec, ctx, stack_data = self.stack_data(data)
        log.info("finetune.teacher: %s cross-fitted within the training folds of fold %d (once)", self.path, k)
        probs = cv.nested_oof(stack_data, spec, k)
        return pd.DataFrame({"id": ctx.ids[ctx.fold_of != k], **dict(zip(LABEL_COLUMNS, probs.T))})

    def fitted_on_training_folds(self, k: int, data: TeacherData, unlabeled: inputs.Unlabeled) -> pd.DataFrame:
        """Stage two fitted on the folds other than k (as for the teacher's own fold k) predicting the unlabeled
        rows."""
        from pipeline.stage_two import cv

        spec, ctx, stack_data = self.stack_data(data, unlabeled)
        log.info("finetune.teacher: %s fold %d labels %d unlabeled rows (once)", self.path, k, len(ctx.test.frame))
        probs = cv.fit_fold(stack_data, spec, spec.members, k).test_probs
        return pd.DataFrame({"id": ctx.test.frame["id"].to_numpy().astype(str), **dict(zip(LABEL_COLUMNS, probs.T))})


def resolve(path: Path) -> Teacher:
    """The teacher a path names: an experiment's stage two (…/stack) or the experiment (its fold adapters)."""
    if path.name == "stack" and (path / layout.MODEL_FILE).is_file():
        return StageTwoTeacher(path, path.parent)
    if path.name != "stack" and (path / "finetune").is_dir():
        return LLMTeacher(path, path)
    raise UserError(f"finetune.teacher={path}: not a finished experiment (no finetune/) nor its stage two (a stack/ "
                    "folder with model.json); name outputs/NAME or outputs/NAME/stack of a finished run")


def check_shared_rows(path: Path, data: TeacherData, frame: pd.DataFrame, fold_of: np.ndarray, n_folds: int) -> None:
    """Refused unless every student row is a teacher row with the same prompt and responses and the same fold."""
    ids = frame["id"].to_numpy().astype(str)
    position = pd.Series(np.arange(len(data.ids)), index=data.ids)
    missing = [i for i in ids if i not in position.index]
    if missing:
        raise UserError(f"finetune.teacher={path}: {len(missing)} rows of this train file are not among the "
                        f"teacher's (first ids {', '.join(missing[:3])}); train the teacher on the same file")
    at = position.loc[ids].to_numpy()
    other = [i for i, same in zip(ids, pair_keys(frame) == pair_keys(data.frame.iloc[at])) if not same]
    if other:
        raise UserError(f"finetune.teacher={path}: {len(other)} rows differ from the teacher's rows of the same id "
                        f"(prompt or responses; first ids {', '.join(other[:3])}); train the teacher on the same file")
    moved = [i for i, a, b in zip(ids, fold_of, data.fold_of[at]) if a != b]
    if moved or int(data.cfg.cv.n_folds) != n_folds:
        raise UserError(f"finetune.teacher={path}: its folds differ from this experiment's ({len(moved)} rows in "
                        f"another fold, first ids {', '.join(moved[:3]) or '-'}; teacher cv.n_folds="
                        f"{data.cfg.cv.n_folds}); teacher and student must share folds: the same train file, seed, "
                        "cv.n_folds and cv.group_by")


@dataclass
class FoldTargets:
    """Per student fold, the teachers' averaged probabilities for every train row (NaN for the fold's own rows,
    which no target is made for), in train-file order."""

    by_fold: dict[int, np.ndarray]
    unlabeled_by_fold: dict[int, np.ndarray] | None = None  # per fold, data.unlabeled's rows' targets (file order)


def load(ctx: RunContext, fold_list: list[int], unlabeled: inputs.Unlabeled | None = None) -> FoldTargets | None:
    """The targets each fold in `fold_list` trains on, and with `unlabeled` those rows' targets per fold (None
    without finetune.teacher)."""
    paths = teacher_paths(ctx.cfg.finetune)
    if not paths:
        return None
    cache_dir = str(ctx.cfg.paths.model_cache_dir)
    width = len(LABEL_COLUMNS)
    by_fold = {k: np.where((ctx.fold_of == k)[:, None], np.nan, np.zeros((len(ctx.ids), width))) for k in fold_list}
    pseudo = None if unlabeled is None else {k: np.zeros((len(unlabeled.data.frame), width)) for k in fold_list}
    for path in paths:
        teacher = resolve(path)
        data = teacher.data(cache_dir)
        check_shared_rows(path, data, ctx.train.frame, ctx.fold_of, ctx.n_folds)
        teacher.check_folds(data, ctx)
        for k in fold_list:
            frame = teacher.fold_targets(k, data, ctx.cfg).set_index("id")
            train = ctx.fold_of != k
            by_fold[k][train] += frame.loc[ctx.ids[train], list(LABEL_COLUMNS)].to_numpy() / len(paths)
            if unlabeled is not None:
                frame = teacher.unlabeled_targets(k, data, unlabeled, ctx.cfg).set_index("id")
                ids = unlabeled.data.frame["id"].to_numpy().astype(str)
                pseudo[k] += frame.loc[ids, list(LABEL_COLUMNS)].to_numpy() / len(paths)
        teacher.release()
    return FoldTargets(by_fold, pseudo)


def check(ctx: RunContext) -> list[dict]:
    """stage=check: each teacher resolved and its rows and folds matched against this experiment's (nothing
    computed). Returns what it found, for metrics.json's check entry."""
    found = []
    for path in teacher_paths(ctx.cfg.finetune):
        teacher = resolve(path)
        data = teacher.data(str(ctx.cfg.paths.model_cache_dir))
        check_shared_rows(path, data, ctx.train.frame, ctx.fold_of, ctx.n_folds)
        teacher.check_folds(data, ctx)
        found.append({"path": str(path), "kind": teacher.kind, "model": str(data.cfg.model.name)})
    return found
