"""The scoring passes of the LLM half, shared by the finetune stage (at the end of each fold, while the model is in
memory), the embed stage (for what is missing) and the Predictor: one forward pass per A/B orientation gives the
head's probabilities and the pooled vectors of every captured layer, as one PassFeatures (their columns and files:
pipeline/feature_table.py).

Under torchrun / accelerate every rank scores a share of each pass's rows (longest first, balanced by tokens)
and rank 0 gathers them (`score_rows`); the manifests record which rank scored how many rows.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline import artifacts, dist, feature_table, layout, locks, setups
from pipeline.context import RunContext
from pipeline.data import swap_probabilities
from pipeline.errors import UserError, require_int
from pipeline.feature_table import HEAD, HEAD_SWAPPED, STORAGE_DTYPES, PassFeatures, VectorKey
from pipeline.formatting import EncodedPair
from pipeline.layout import EmbedFoldRecord
from pipeline.llm.adapters import (average_adapters, merged_lora, model_scoring_fingerprint,
                                   saved_scoring_fingerprint)
from pipeline.llm.inference import LMHead, forward_pass, softmax

log = logging.getLogger(__name__)
POOLINGS = ("mean", "last")
TEST_ADAPTERS = ("each", "averaged")


def validate(embed_cfg: DictConfig) -> None:
    """Fail before any model loads on embed settings that cannot work."""
    if embed_cfg.storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"embed.storage_dtype={embed_cfg.storage_dtype}: use one of {', '.join(STORAGE_DTYPES)}")
    if embed_cfg.pooling not in POOLINGS:
        raise UserError(f"embed.pooling={embed_cfg.pooling}: use one of {', '.join(POOLINGS)}")
    layers = list(embed_cfg.layers)
    bad = [f for f in layers if not isinstance(f, (int, float)) or not 0 < float(f) <= 1]
    if not layers or bad:
        raise UserError(f"embed.layers={layers}: give fractions of the model's depth in (0, 1], e.g. [0.5, 1.0] "
                        "(1.0 = the final norm the head reads)")
    if embed_cfg.test_adapters not in TEST_ADAPTERS:
        raise UserError(f"embed.test_adapters={embed_cfg.test_adapters}: use each (every fold adapter scores the test "
                        "rows, features averaged) or averaged (the fold adapters averaged into one: one pass)")
    if int(embed_cfg.batch_tokens) < 1:
        raise UserError(f"embed.batch_tokens={embed_cfg.batch_tokens}: must be a positive token budget")
    padding = embed_cfg.max_batch_padding
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, (int, float))
                                or not 0 <= padding < 1):
        raise UserError(f"embed.max_batch_padding={padding}: give a share of a batch in [0, 1), e.g. 0.1, or null "
                        "to fill every batch up to embed.batch_tokens")
    if embed_cfg.max_length is not None:
        require_int(embed_cfg.max_length, "embed.max_length", 16)
    for key in ("lm_features", "merge_lora"):
        if not isinstance(embed_cfg[key], bool):
            raise UserError(f"embed.{key}={embed_cfg[key]}: use true or false")


@dataclass
class Rows:
    """Encoded rows of one pass: the original orientation and, with swap TTA, the swapped one."""

    encoded: list[EncodedPair]
    swapped: list[EncodedPair] | None

    def take(self, index: np.ndarray) -> "Rows":
        return Rows([self.encoded[i] for i in index],
                    None if self.swapped is None else [self.swapped[i] for i in index])

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]

    def __len__(self) -> int:
        return len(self.encoded)


def encode_rows(tokenizer, frame: pd.DataFrame, cfg: DictConfig) -> Rows:
    """Encode once for the scoring passes, at embed.max_length when set (train short, score long: the head and the
    vectors see whole responses while training stays short); the swapped orientation only when swap TTA needs it."""
    from pipeline.formatting import encode_frame

    length = cfg.embed.max_length
    return Rows(encode_frame(tokenizer, frame, cfg.model, max_length=length),
                encode_frame(tokenizer, frame, cfg.model, swap=True, max_length=length) if cfg.embed.swap_tta else None)


@dataclass
class PassSettings:
    """How a feature pass runs: the pad id, the embed settings (layers, pooling, token budget), device and dtype,
    and the base model's folder (where an untied LM head is read for embed.lm_features)."""

    pad_id: int
    embed: DictConfig
    device: torch.device
    dtype: torch.dtype
    source: Path | str | None = None
    _lm_head: LMHead | None = field(default=None, repr=False)

    def lm_head(self, model) -> LMHead | None:
        """The LM head for the likelihood features (read once; None without embed.lm_features)."""
        if not self.embed.lm_features:
            return None
        if self._lm_head is None:
            from pipeline.llm.modeling import output_embeddings

            weight = output_embeddings(model, self.source)
            if weight is None:
                raise UserError(f"embed.lm_features=true needs the LM head, and {self.source} has no lm_head.weight "
                                "(nor tied embeddings); set embed.lm_features=false for this model")
            softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2 caps its LM logits
            self._lm_head = LMHead(weight.to(self.device, torch.float32), softcap)
        return self._lm_head


def _orient(vectors: dict[tuple[str, str], np.ndarray], orientation: str,
            base: bool = False) -> dict[str, np.ndarray]:
    """Pass vectors keyed by (layer, slot) -> keyed by response identity (VectorKey names; `base`: the base model's
    vectors). In the swapped pass slot A holds response_b."""
    out = {}
    for (layer, span), matrix in vectors.items():
        if orientation == "swp" and span in ("a", "b"):
            span = "b" if span == "a" else "a"
        out[str(VectorKey(layer, span, orientation, base))] = matrix
    return out


def pass_features(model, rows: Rows, settings: PassSettings, desc: str = "") -> PassFeatures:
    """Head probabilities and pooled vectors of both orientations (the columns: pipeline/feature_table.py)."""
    model.eval()  # dropout off: held-out rows are scored as a deployed model would score them
    embed_cfg = settings.embed

    def one_pass(encoded: list[EncodedPair], name: str):
        return forward_pass(model, encoded, settings.pad_id, int(embed_cfg.batch_tokens), settings.device,
                            settings.dtype, layers=list(embed_cfg.layers), pooling=embed_cfg.pooling,
                            padding_side=embed_cfg.padding_side, desc=f"{desc} {name}".strip(),
                            lm_head=settings.lm_head(model), max_padding=embed_cfg.max_batch_padding)

    orientations = [("fwd", rows.encoded)] + ([("swp", rows.swapped)] if rows.swapped is not None else [])
    out: dict[str, np.ndarray] = {}
    with merged_lora(model, enabled=bool(embed_cfg.merge_lora)):
        for orientation, encoded in orientations:
            result = one_pass(encoded, orientation)
            probs = softmax(result.logits)
            out[HEAD if orientation == "fwd" else HEAD_SWAPPED] = probs if orientation == "fwd" else \
                swap_probabilities(probs)
            out.update(_orient(result.vectors, orientation))
    if embed_cfg.base_vectors and hasattr(model, "disable_adapter"):
        with model.disable_adapter():  # the same base weights without LoRA: does fine-tuning help the vectors?
            for orientation, encoded in orientations:
                result = one_pass(encoded, f"base {orientation}")
                out.update(_orient(result.vectors, orientation, base=True))
    return PassFeatures.from_columns(out)


@dataclass
class Scored:
    """A pass's features (on rank 0; None on the other ranks), which rank scored each row, and per rank how many
    rows / tokens."""

    features: PassFeatures | None
    rank_of_row: np.ndarray
    ranks: list[dict[str, int]]


def score_rows(model, rows: Rows, settings: PassSettings, shard_folder: Path, desc: str = "") -> Scored:
    """`pass_features` over `rows`, shared across the ranks of a distributed run: each rank scores its share and
    leaves it in `shard_folder`; rank 0 puts the rows back in order. One process: a plain pass."""
    world = dist.world_size()
    lengths = rows.lengths
    shares = dist.shard_rows(lengths, world) if world > 1 else [np.arange(len(rows))]
    ranks = [{"rank": r, "rows": int(len(share)), "tokens": int(sum(lengths[i] for i in share))}
             for r, share in enumerate(shares)]
    rank_of_row = np.zeros(len(rows), dtype=np.int64)
    for r, share in enumerate(shares):
        rank_of_row[share] = r
    if world == 1:
        return Scored(pass_features(model, rows, settings, desc), rank_of_row, ranks)
    rank = dist.rank()
    mine = shares[rank]
    if len(mine):
        feats = pass_features(model, rows.take(mine), settings, f"{desc} rank {rank}".strip())
        feature_table.write_feature_table(shard_folder / f"rank_{rank}.parquet", {"row": mine}, feats.columns(),
                                          dtype="float32")
    dist.barrier()
    if rank != 0:
        return Scored(None, rank_of_row, ranks)
    gathered: dict[str, np.ndarray] = {}
    for r, share in enumerate(shares):
        if not len(share):
            continue
        table = feature_table.read_feature_table(shard_folder / f"rank_{r}.parquet")
        scalars, matrices = table.scalars, table.matrices
        for name, matrix in matrices.items():
            if name not in gathered:
                gathered[name] = np.zeros((len(rows), matrix.shape[1]), dtype=np.float32)
            gathered[name][scalars["row"].to_numpy()] = matrix
    shutil.rmtree(shard_folder, ignore_errors=True)
    return Scored(PassFeatures.from_columns(gathered), rank_of_row, ranks)


def write_train_fold(ctx: RunContext, k: int, scored: Scored, setup: dict, adapter_train_folds: list[int],
                     seconds: float) -> None:
    """Fold k's OOF features (its held-out rows, scored by its adapter) and its done-marker, which records what
    the leak check reads: the adapter, the folds it trained on, and which rank scored how many rows."""
    held_out = np.flatnonzero(ctx.fold_of == k)
    lay = ctx.layout
    feature_table.write_features(lay.fold_features(k), ctx.ids[held_out], np.full(len(held_out), k), scored.features,
                   ctx.cfg.embed.storage_dtype)
    record = EmbedFoldRecord(k, str(lay.adapter(k)), adapter_train_folds, int(len(held_out)), round(seconds, 2),
                             scored.ranks)
    artifacts.mark_done(lay.embed_fold(k), record.as_state(setup))


def averaged_adapter(ctx: RunContext, ft_states: list[dict]) -> Path:
    """The fold adapters averaged into one (made once per fine-tune; rank 0 writes it, every rank reads it). A
    read-only experiment without it gets it in the run's own output folder."""
    lay = ctx.layout
    made_from = {"finetune": ft_states[0]["config_hash"], "data": ft_states[0]["data"],
                 "adapters": [str(lay.adapter(k)) for k in range(ctx.n_folds)]}
    if feature_table.is_current(lay.averaged_adapter.parent, made_from):
        return lay.averaged_adapter
    target = ctx.out.averaged_adapter
    if ctx.is_main and not feature_table.is_current(target.parent, made_from):
        average_adapters([lay.adapter(k) for k in range(ctx.n_folds)], target)
        artifacts.mark_done(target.parent, made_from)
    dist.barrier()
    return target


def extract_missing(ctx: RunContext, ft_states: list[dict], setup: dict, train_folds: list[int],
                    with_test: bool) -> None:
    """Run the passes still missing: the OOF features of `train_folds` and, with a test file, its features per
    fold adapter (or once with the averaged adapter). The base model is loaded once and each adapter is swapped
    on it."""
    from pipeline.llm import modeling

    cfg, lay = ctx.cfg, ctx.layout
    folder = feature_table.test_folder(ctx, ft_states[0]) if with_test and ctx.test is not None else None
    averaged = cfg.embed.test_adapters == "averaged"
    test_passes: list[int | None] = []
    if folder is not None:
        wanted = [None] if averaged else list(range(ctx.n_folds))
        test_passes = [k for k in wanted if not layout.test_fold_features(folder, k).exists()]
    if not (train_folds or test_passes):
        return
    twins = test_pass_twins(ctx, test_passes)
    test_scored = [k for k in test_passes if k not in twins]  # None (the averaged adapter) included
    to_score = set(train_folds) | set(test_scored)
    if to_score:  # else every pass left is a copy: no model to load
        source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
        tokenizer = modeling.load_tokenizer(source, cfg.model)
        settings = PassSettings(tokenizer.pad_token_id, cfg.embed, ctx.device, ctx.dtype, source)
        train_rows = encode_rows(tokenizer, ctx.train.frame, cfg) if train_folds else None
        test_rows = encode_rows(tokenizer, ctx.test.frame, cfg) if test_scored else None
        model = modeling.load_classifier(source, cfg.model, tokenizer, ctx.dtype, ctx.device)
    for k in sorted(set(train_folds) | {k for k in test_passes if k is not None}):  # a twin's source goes first
        if k in to_score:
            start = time.perf_counter()
            model = modeling.attach_adapter(model, lay.adapter(k), f"fold_{k}")
        if k in train_folds:
            if ctx.is_main:
                artifacts.mark_started(lay.embed_fold(k), setup)
            held_out = np.flatnonzero(ctx.fold_of == k)
            scored = score_rows(model, train_rows.take(held_out), settings, ctx.out.shard_folder(f"fold_{k}"),
                                desc=f"embed fold {k}")
            if ctx.is_main:
                write_train_fold(ctx, k, scored, setup, ft_states[k]["train_folds"], time.perf_counter() - start)
        if k in twins:
            copy_test_pass(ctx, folder, twins[k], k)
        elif k in test_scored:
            write_test_pass(ctx, folder, k, model, test_rows, settings)
    if None in test_passes:
        model = modeling.attach_adapter(model, averaged_adapter(ctx, ft_states), "averaged")
        write_test_pass(ctx, folder, None, model, test_rows, settings)


def test_pass_twins(ctx: RunContext, test_passes: list[int | None]) -> dict[int, int]:
    """For each fold in `test_passes` whose adapter scores as another fold's (equal adapters.scoring_fingerprint,
    e.g. the frozen path's folds), the fold whose test pass it takes: one already written, or one scored earlier in
    this run (folds go in order). Decided from the adapters alone, so every rank decides the same. Trained folds never
    score alike, so their adapters are not even read."""
    folds = [k for k in test_passes if k is not None]
    if not folds or ctx.cfg.finetune.train:
        return {}
    fingerprints = {j: saved_scoring_fingerprint(ctx.layout.adapter(j)) for j in range(ctx.n_folds)}
    twins = {}
    for k in folds:
        earlier = [j for j in range(ctx.n_folds) if j != k and fingerprints[j] == fingerprints[k]
                   and (j not in folds or j < k)]
        if earlier:
            twins[k] = earlier[0]
    return twins


def written_twin(ctx: RunContext, folder: Path, model, k: int) -> int | None:
    """At fold k's end: a finished fold whose test pass is written in `folder` and whose adapter scores as fold k's
    model does (equal adapters.scoring_fingerprint), else None (always for trained folds: none score alike)."""
    if ctx.cfg.finetune.train:
        return None
    written = [j for j in range(ctx.n_folds) if j != k and layout.test_fold_features(folder, j).exists()
               and (ctx.layout.adapter(j) / "adapter_model.safetensors").exists()]
    if not written:
        return None
    fingerprint = model_scoring_fingerprint(model)
    return next((j for j in written if saved_scoring_fingerprint(ctx.layout.adapter(j)) == fingerprint), None)


def copy_test_pass(ctx: RunContext, folder: Path, twin: int, k: int) -> None:
    """Fold k's test features are fold `twin`'s: their adapters score every row the same (test_pass_twins), so the
    pass that was run serves both."""
    if ctx.is_main:
        with artifacts.atomic_path(layout.test_fold_features(folder, k)) as tmp:
            shutil.copyfile(layout.test_fold_features(folder, twin), tmp)
    log.info("fold %d scores as fold %d (the same adapter, LoRA B = 0 aside): its test pass is fold %d's", k, twin,
             twin)


def write_test_pass(ctx: RunContext, folder: Path, k: int | None, model, rows: Rows, settings: PassSettings) -> None:
    """The test rows scored by fold k's adapter (or the averaged one, k=None), in test-file order; the `rank`
    column says which rank scored each row."""
    name = "averaged" if k is None else f"fold_{k}"
    scored = score_rows(model, rows, settings, ctx.out.shard_folder(f"test_{name}"), desc=f"{name} test")
    if not ctx.is_main:
        return
    feature_table.write_feature_table(layout.test_fold_features(folder, k),
                                      {"id": ctx.test.frame["id"].to_numpy().astype(str),
                                       "fold": np.full(len(rows), -1), "rank": scored.rank_of_row},
                                      scored.features.columns(), dtype=ctx.cfg.embed.storage_dtype)


def combine_train(ctx: RunContext) -> int | None:
    """Gather the folds' OOF features into train_features.parquet in data order, with the manifest the leak
    check reads. Returns the vectors' width."""
    cfg, lay = ctx.cfg, ctx.layout
    states = [artifacts.read_state(lay.embed_fold(k)) for k in range(ctx.n_folds)]
    parts = [feature_table.read_feature_table(lay.fold_features(k)) for k in range(ctx.n_folds)]
    scalars = pd.concat([p.scalars for p in parts], ignore_index=True)
    order = pd.Series(np.arange(len(scalars)), index=scalars["id"].astype(str)).loc[ctx.ids].to_numpy()
    matrices = {name: np.concatenate([p.matrices[name] for p in parts])[order] for name in parts[0].matrices}
    feature_table.write_feature_table(lay.train_features, {"id": ctx.ids, "fold": scalars["fold"].to_numpy()[order],
                                                           "label": ctx.labels},
                                      matrices, dtype=cfg.embed.storage_dtype)
    artifacts.write_json(lay.embed_manifest, {
        "train": {f"fold_{k}": {key: s.get(key) for key in ("adapter", "adapter_train_folds", "scored_fold",
                                                            "n_train_rows", "ranks")} for k, s in enumerate(states)},
        "setup": {key: states[0][key] for key in ("seed", "finetune", "data", "config_hash")},
        "layers": [float(f) for f in cfg.embed.layers], "pooling": cfg.embed.pooling,
        "swap_tta": bool(cfg.embed.swap_tta), "base_vectors": bool(cfg.embed.base_vectors),
        "columns": sorted(matrices)})
    return PassFeatures.from_columns(matrices).width


def finish_test(ctx: RunContext, folder: Path, ft_states: list[dict]) -> None:
    """The test rows' features: the mean over the fold adapters' passes (head probabilities and vectors), or the
    averaged adapter's single pass; with a manifest of which adapters and ranks scored them."""
    cfg = ctx.cfg
    averaged = cfg.embed.test_adapters == "averaged"
    passes = [None] if averaged else list(range(ctx.n_folds))
    tables = [feature_table.read_feature_table(layout.test_fold_features(folder, k)) for k in passes]
    features = PassFeatures.mean([t.features for t in tables])
    feature_table.write_features(folder / layout.TEST_FEATURES, ctx.test.frame["id"].to_numpy(),
                                 np.full(len(ctx.test.frame), -1), features, cfg.embed.storage_dtype)
    lay = ctx.layout
    artifacts.write_json(folder / layout.MANIFEST, {
        "file": ctx.test.source, "n_rows": int(len(ctx.test.frame)),
        "adapters": [str(lay.averaged_adapter)] if averaged else [str(lay.adapter(k)) for k in passes],
        "adapter_configs": [s["config_hash"] for s in ft_states],
        "aggregation": (f"one pass with the {ctx.n_folds} fold adapters averaged into one (LoRA deltas and heads)"
                        if averaged else f"mean over the {ctx.n_folds} fold adapters of head probabilities and "
                                         "vectors"),
        "ranks": {("averaged" if k is None else f"fold_{k}"): rank_counts(t.scalars) for k, t in zip(passes, tables)}})


def rank_counts(scalars: pd.DataFrame) -> dict[str, int]:
    """How many rows each rank scored (files from before sharding have no `rank` column: one process)."""
    ranks = scalars["rank"] if "rank" in scalars else pd.Series(np.zeros(len(scalars), dtype=np.int64))
    return {str(r): int(n) for r, n in ranks.value_counts().sort_index().items()}


def ensure_test_features(ctx: RunContext) -> Path:
    """The test file's feature table for this setup, extracting only the passes still missing (every rank takes
    part; rank 0 writes). The fold locks are held, so no fine-tune job is writing an adapter it reads."""
    with locks.folds([ctx.layout.finetune_fold(k) for k in range(ctx.n_folds)], "stage=predict reading the adapters"):
        return _ensure_test_features(ctx)


def _ensure_test_features(ctx: RunContext) -> Path:
    ft_states = feature_table.finetune_fold_states(ctx)
    setup = setups.embed_setup(ctx.cfg, ft_states[0])
    folder = feature_table.test_folder(ctx, ft_states[0])
    if not (folder / layout.TEST_FEATURES).exists():
        extract_missing(ctx, ft_states, setup, [], with_test=True)
        if ctx.is_main:
            finish_test(ctx, folder, ft_states)
    return folder / layout.TEST_FEATURES


