"""Use a finished experiment from Python, or take it anywhere as an export (no Hydra, no command line):

    from pipeline import Predictor
    predictor = Predictor.load("outputs/shared_ties")          # an experiment folder, or its export/
    probs = predictor.predict_proba(test_df)                    # (n, 3): a, b, tie, as stage=predict writes them
    feats = predictor.features(test_df)                         # head probabilities and pooled vectors
    predictor.info                                              # model, settings, OOF scores

Scoring is the code stage=predict runs: rows encoded with the recorded formatting (the tokenizer's BOS included),
one forward pass per orientation and fold adapter on one loaded base model (rows batched by length), the features
averaged over the adapters and stored at `embed.storage_dtype` exactly as the feature files hold them, then each
outer fold's stage two and their mean, clipped and normalised as the submission is. From an experiment, stage two
is refitted from its OOF features (deterministic, seconds); from an export, it is rebuilt from the exported numbers
(LightGBM text models, linear coefficients, PCA components, blend weights), bit for bit, with no training data.
Nothing is written unless asked (`export`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, embed_passes, feature_table, layout, setups

from pipeline.stage_two import cv, design, store

from pipeline.stage_two.spec import StackSpec
from pipeline.llm import modeling
from pipeline.llm.adapters import saved_scoring_fingerprint
from pipeline.data import LABEL_COLUMNS, PairData, parse_frame
from pipeline.errors import UserError
from pipeline.feature_table import PassFeatures

EXPORT_FILE = "export.json"
EXPORT_FORMAT = 1
EXPORT_MODES = ("adapters", "merged")
# What an export writes at its top level; anything else in an export folder (README's `wheels/`, a user's notes) is
# the user's and survives a re-export.
EXPORT_ENTRIES = ("model", "adapters", "stack", EXPORT_FILE, "README.md")


@dataclass
class PairFeatures:
    """What the fine-tuned model says about each pair: the head's probabilities (both orientations averaged) and
    the pooled vectors, keyed `{layer}_{span}_{orientation}` (pipeline.feature_table.VectorKey)."""

    ids: np.ndarray
    passes: PassFeatures              # everything stage two reads, as the feature files hold it

    @property
    def head(self) -> np.ndarray:
        return self.passes.head_probabilities()

    @property
    def vectors(self) -> dict[str, np.ndarray]:
        return {**self.passes.vectors, **self.passes.likelihoods}

    @property
    def matrices(self) -> dict[str, np.ndarray]:
        """The feature-file columns (head, head_swapped, vectors)."""
        return self.passes.columns()


def as_pair_data(pairs: pd.DataFrame | Sequence[dict]) -> PairData:
    """Pairs in the Kaggle test layout (id, prompt, response_a, response_b), as a DataFrame or a list of dicts;
    cells may be JSON lists of turns (as in Kaggle's files), Python lists, or plain text."""
    frame = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs))
    return parse_frame(frame.reset_index(drop=True), source="pairs", with_labels=False)


def stored_features(features: PassFeatures, dtype: str) -> PassFeatures:
    """Features as a feature file gives them back: written at `dtype`, read as float32."""
    return PassFeatures.from_columns({name: np.ascontiguousarray(m, dtype=dtype).astype(np.float32)
                                      for name, m in features.columns().items()})


class Predictor:
    """A finished experiment (or its export), ready to score new pairs. Build it with `Predictor.load(path)`."""

    def __init__(self, cfg: DictConfig, source: Path | str, adapters: list[Path], spec: StackSpec,
                 vectors: dict, fold_models: list[store.FoldModel], info: dict, device: str | None = None):
        self.cfg = cfg
        self.source = source
        self.adapters = adapters          # fold adapters (or the averaged one); [] for a merged export
        self.spec = spec
        self.vectors = vectors
        self.fold_models = fold_models
        self.info = info
        try:
            self.device = torch.device(device) if device else modeling.device()
        except RuntimeError:
            raise UserError(f"device={device!r} is not a device torch knows; use 'cpu' or 'cuda'") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device={device!r}: this machine has no CUDA GPU; use device='cpu' (or leave it unset)")
        self.dtype = modeling.compute_dtype(cfg.model.precision, self.device)
        self._tokenizer = None
        self._model = None           # the base model, loaded at the first call and kept (adapters swap on it)
        self._active_adapter: Path | None = None
        self._twins: dict[int, int] | None = None  # adapter -> an earlier one it scores as (see adapter_twins)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "Predictor":
        """An export folder (holding export.json) or an experiment folder (holding stack/model.json)."""
        path = Path(path)
        if (path / EXPORT_FILE).is_file():
            return cls.from_export(path, device)
        if (path / "stack" / layout.MODEL_FILE).is_file() or (path / "finetune").is_dir():
            return cls.from_experiment(path, device=device)
        raise UserError(f"{path} is neither an export (no {EXPORT_FILE}) nor a finished experiment (no "
                        f"stack/{layout.MODEL_FILE}); run stage=all and stage=export first")

    @classmethod
    def from_experiment(cls, exp: Path, cfg: DictConfig | None = None, device: str | None = None) -> "Predictor":
        """The experiment's recorded settings (or `cfg`, already checked against them); stage two refitted from
        its OOF features as stage=predict does. Needs the experiment's train file."""
        from pipeline import context

        exp = Path(exp)
        cfg = cfg if cfg is not None else recorded_experiment_config(exp)
        spec = StackSpec.from_config(cfg.stack, cfg.seed)
        with tempfile.TemporaryDirectory(prefix="predictor_") as scratch:  # the run context's manifest goes here
            ctx = context.open_run(cfg, "predictor", out_root=Path(scratch))
            ft_states = feature_table.finetune_fold_states(ctx)
            result = cv.score(ctx, spec, baselines=False)
        lay = layout.Layout(exp)
        averaged = cfg.embed.test_adapters == "averaged"
        adapters = [lay.averaged_adapter] if averaged else [lay.adapter(k) for k in range(int(cfg.cv.n_folds))]
        if averaged and not feature_table.is_current(lay.averaged_adapter.parent, {"finetune": ft_states[0]["config_hash"],
                                                                              "data": ft_states[0]["data"]}):
            raise UserError(f"{lay.averaged_adapter} is missing or stale; run stage=predict "
                            "embed.test_adapters=averaged once (it builds the averaged adapter)")
        metrics = artifacts.read_metrics(exp)
        info = {"source": "experiment", "path": str(exp), "model": OmegaConf.to_container(cfg.model, resolve=True),
                "n_folds": int(cfg.cv.n_folds), "test_adapters": cfg.embed.test_adapters,
                "finetune_oof_logloss": metrics.get("finetune", {}).get("oof_logloss"),
                "stack_oof_logloss": metrics.get("stack", {}).get("oof_logloss"),
                "n_train_rows": int(len(ctx.ids))}
        source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
        return cls(cfg, source, adapters, spec, result.data.vectors, [f.model for f in result.folds], info, device)

    @classmethod
    def from_export(cls, folder: Path, device: str | None = None) -> "Predictor":
        """A folder written by stage=export: read only, no training data, no pickle."""
        folder = Path(folder)
        try:
            record = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
            if record.get("format") != EXPORT_FORMAT:
                raise ValueError(f"format {record.get('format')!r}, expected {EXPORT_FORMAT}")
            cfg = setups.with_added_settings(OmegaConf.create({key: record[key]
                                                               for key in ("model", "embed", "stack", "seed")}))
            adapters = [folder / a for a in record["adapters"]]
            folds, vectors, info = record["folds"], record["vectors"], record["info"]
            mode, files = info["mode"], record.get("files")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{folder / EXPORT_FILE} is missing or damaged ({exc}); run stage=export again") from None
        if (mode == "adapters") != bool(adapters) or mode not in EXPORT_MODES:
            raise UserError(f"{folder / EXPORT_FILE} is damaged: a {mode!r} export with adapters {record['adapters']} "
                            "(an adapters export lists its fold adapters, a merged one none); run stage=export again")
        store.check_recorded_targets(record["stack"], OmegaConf.create({}), folder / EXPORT_FILE)
        spec = StackSpec.from_config(cfg.stack, cfg.seed)
        for path in [folder / "model", *adapters]:
            if not path.is_dir():
                raise UserError(f"{path} not found; the export is incomplete: run stage=export again")
        if files is not None:  # exports made before fingerprints were recorded are read as they are
            check_export_files(folder, files)
        try:
            fold_models = [store.load_fold_model(fold, folder / "stack" / f"fold_{k}", spec.members)
                           for k, fold in enumerate(folds)]
        except UserError:
            raise
        except Exception as exc:  # numpy, zipfile and LightGBM each raise their own types for a damaged file
            raise UserError(f"{folder / 'stack'} is damaged ({type(exc).__name__}: {exc}); the export is incomplete: "
                            "run stage=export again") from None
        predictor = cls(cfg, folder / "model", adapters, spec, vectors, fold_models, {**info, "path": str(folder)},
                        device)
        try:
            predictor.tokenizer  # loaded now: a damaged tokenizer is named at load, not at the first call
        except Exception as exc:  # transformers raises ValueError, OSError or its own types
            raise UserError(f"{folder / 'model'}: its tokenizer cannot be loaded ({type(exc).__name__}); the export "
                            "is incomplete: run stage=export again") from None
        return predictor

    # ------------------------------------------------------------------------------------------------ scoring
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = modeling.load_tokenizer(self.source, self.cfg.model)
        return self._tokenizer

    def features(self, pairs: pd.DataFrame | Sequence[dict]) -> PairFeatures:
        """One pass per orientation and adapter over the pairs (rows batched by length), averaged over the adapters
        and stored as the feature files store them."""
        return self._features(as_pair_data(pairs))

    def predict_proba(self, pairs: pd.DataFrame | Sequence[dict]) -> np.ndarray:
        """(n, 3) probabilities of a wins, b wins, tie: what stage=predict writes for these rows."""
        return self._predict_proba(as_pair_data(pairs))

    def predict(self, pairs: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
        """The submission layout: id and the three probability columns."""
        data = as_pair_data(pairs)
        probs = self._predict_proba(data)
        return pd.DataFrame({"id": data.frame["id"].to_numpy(), **dict(zip(LABEL_COLUMNS, probs.T))})

    def _features(self, data: PairData) -> PairFeatures:
        tokenizer = self.tokenizer
        rows = embed_passes.encode_rows(tokenizer, data.frame, self.cfg)
        settings = embed_passes.PassSettings(tokenizer.pad_token_id, self.cfg.embed, self.device, self.dtype, self.source)
        if self._model is None:
            self._model = modeling.load_classifier(self.source, self.cfg.model, tokenizer, self.dtype, self.device)
        dtype = self.cfg.embed.storage_dtype
        passes = []
        for k, adapter in enumerate(self.adapters or [None]):
            if k in self.adapter_twins:  # the same model as an earlier fold's: the same features
                passes.append(passes[self.adapter_twins[k]])
                continue
            if adapter is not None and adapter != self._active_adapter:
                self._model = modeling.attach_adapter(self._model, adapter,
                                                      f"fold_{k}" if len(self.adapters) > 1 else "averaged")
                self._active_adapter = adapter
            feats = embed_passes.pass_features(self._model, rows, settings,
                                               desc=f"adapter {k + 1}/{len(self.adapters or [0])}")
            passes.append(stored_features(feats, dtype))
        return PairFeatures(data.frame["id"].to_numpy(), stored_features(PassFeatures.mean(passes), dtype))

    @property
    def adapter_twins(self) -> dict[int, int]:
        """Fold adapters that score as an earlier one (equal adapters.scoring_fingerprint: the frozen path's folds),
        each with that earlier one, whose pass serves both, as stage=predict shares it (worked out once: an export
        records no finetune settings to tell a frozen experiment by)."""
        if self._twins is None:
            fingerprints = [saved_scoring_fingerprint(adapter) for adapter in self.adapters]
            self._twins = {k: fingerprints.index(fp) for k, fp in enumerate(fingerprints)
                           if fingerprints.index(fp) != k}
        return self._twins

    def _predict_proba(self, data: PairData) -> np.ndarray:
        pair = design.stacker_inputs(data.frame, self._features(data).passes)
        probs = np.mean([m.predict(pair, self.vectors, self.spec.symmetric) for m in self.fold_models], axis=0)
        return store.submission_probabilities(probs)

    # ------------------------------------------------------------------------------------------------- export
    def export(self, folder: Path, mode: str = "adapters", made_by: Sequence[str] = ()) -> dict:
        """Write a self-contained folder another machine scores from offline, read-only: the classifier (the base
        model with the fold adapters, or the adapters averaged and merged into it: `mode`), its tokenizer, the
        formatting and embed settings, stage two as numbers, and a README model card. Returns what was written."""
        if mode not in EXPORT_MODES:
            raise UserError(f"export.model={mode}: use {' or '.join(EXPORT_MODES)}")
        if mode == "merged" and self.spec.vectors.source == "base":
            raise UserError("export.model=merged cannot give the base model's vectors or likelihoods "
                            "(stack.vectors.source=base); use export.model=adapters")
        folder = Path(folder)
        check_export_target(folder, Path(self.info["path"]), experiment=self.info["source"] == "experiment")
        artifacts.remove_stale_temp_files(folder.parent, name=folder.name)
        staging = artifacts.staging_dir(folder)
        try:
            record = self._write_export(staging, mode, made_by)
            keep_user_entries(folder, staging)
            artifacts.replace_dir(staging, folder)
        except BaseException as exc:  # an interrupt or a refusal too: the staging copy never stays behind
            restore_user_entries(staging, folder)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, a read-only target (shutil.Error is one, with no errno)
                raise UserError(f"export to {folder} failed ({export_failure(exc)}); nothing was replaced: free "
                                "space there or choose another export.dir") from None
            raise
        return {"dir": str(folder), "mode": mode, "size_mb": round(folder_size(folder) / 2 ** 20, 1),
                "n_folds": len(record["folds"])}

    def _write_export(self, staging: Path, mode: str, made_by: Sequence[str]) -> dict:
        """Everything an export holds, written into `staging`; returns its export.json record."""
        length = self.spec.baselines["length"].name
        records = [store.save_fold_model(m, staging / "stack" / f"fold_{k}", length)
                   for k, m in enumerate(self.fold_models)]
        if mode == "adapters":
            copy_model_folder(Path(str(self.source)), staging / "model")
            names = []
            for k, adapter in enumerate(self.adapters):
                shutil.copytree(adapter, staging / "adapters" / f"fold_{k}")
                names.append(f"adapters/fold_{k}")
        else:
            merged = self.merged_model()
            merged.save_pretrained(staging / "model")
            self.tokenizer.save_pretrained(staging / "model")
            if self.cfg.embed.lm_features and not merged.config.tie_word_embeddings:
                # A classifier saves no LM head; the likelihood features read it from the model folder.
                from safetensors.torch import save_file

                head = modeling.output_embeddings(merged, self.source)
                if head is not None:
                    save_file({"lm_head.weight": head.contiguous()}, str(staging / "model" / "lm_head.safetensors"))
            names = []
        embed = OmegaConf.to_container(self.cfg.embed, resolve=True)
        if mode == "merged":
            embed["test_adapters"] = "averaged"
        info = {**{k: v for k, v in self.info.items() if k != "path"}, "source": "export", "mode": mode,
                "made_by": list(made_by)}
        record = {"format": EXPORT_FORMAT, "model": OmegaConf.to_container(self.cfg.model, resolve=True),
                  "embed": embed, "stack": OmegaConf.to_container(self.cfg.stack, resolve=True),
                  "seed": int(self.cfg.seed), "vectors": self.vectors, "adapters": names, "folds": records,
                  "info": info, "versions": artifacts.package_versions()}
        artifacts.write_text(staging / "README.md", model_card(record))
        # Every file by content, so a truncated upload, a missing tokenizer file or a swapped fold adapter is named
        # at load instead of scoring silently (README and export.json themselves excepted).
        record["files"] = {str(path.relative_to(staging)): modeling.file_sample_fingerprint(path)
                           for path in sorted(staging.rglob("*")) if path.is_file() and path.name != "README.md"}
        artifacts.write_json(staging / EXPORT_FILE, record)
        artifacts.apply_user_mode(staging)
        return record

    def merged_model(self):
        """The fold adapters averaged into one (exact for the mean of the merged fold models) and merged into the
        base weights, `score` head included: a plain transformers sequence classifier. The merge runs in fp32 on the
        CPU from the unquantised base (a merge into 4-bit weights would be lossy) and the result is stored in the
        base checkpoint's own dtype (Llama-3's bf16, SmolLM2's converted fp32); a quantised preset quantises it again
        when it is loaded."""
        model_cfg = OmegaConf.merge(self.cfg.model, {"quantization": "none"})
        with tempfile.TemporaryDirectory(prefix="averaged_") as scratch:  # removed once the merge has read it
            averaged = self.adapters[0]
            if len(self.adapters) > 1:
                averaged = Path(scratch) / "adapter"
                embed_passes.average_adapters(self.adapters, averaged)
            model = modeling.load_with_adapter(self.source, model_cfg, self.tokenizer, averaged, torch.float32,
                                               torch.device("cpu")).merge_and_unload()
        return model.to(checkpoint_dtype(Path(str(self.source))))


def recorded_experiment_config(exp: Path) -> DictConfig:
    """The config the experiment's stacker was made with (stack/model.json, written with the stacker as one unit;
    manifests/stack.json for stackers made before it recorded one), pointed at where the folder is now, with the
    recorded stack settings (store.with_recorded_stack; nothing beyond the allow-list trusted)."""
    lay = layout.Layout(exp)
    model_file, manifest = lay.stack / layout.MODEL_FILE, lay.manifest("stack")
    if not artifacts.read_state(lay.stack) or not model_file.is_file():
        raise UserError(f"{lay.stack} holds no finished stacker; run stage=stack (or stage=all) first")
    try:
        saved = artifacts.read_json(model_file)
        config = saved["config"] if "config" in saved else artifacts.read_json(manifest)["config"]
        cfg = setups.with_added_settings(OmegaConf.create(config))
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{model_file} is damaged; re-run stage=stack") from None
    cfg.paths.exp_dir, cfg.paths.output_dir, cfg.exp_name = str(exp), str(exp.parent), exp.name
    cfg.data.test = None
    from pipeline import inputs

    train = inputs.data_paths(cfg).train
    if not Path(train).is_file():
        raise UserError(f"{train} (the experiment's train file) not found: the stacker is refitted from it; copy it "
                        "back, or score with an export (stage=export), which needs no training data")
    return store.with_recorded_stack(cfg, lay, trusted=OmegaConf.create({}))


def check_export_files(folder: Path, files: dict[str, str]) -> None:
    """Every file the export wrote is there with the content it had (sampled for large weights)."""
    for name, fingerprint in files.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} not found; the export is incomplete (an interrupted copy or upload?): run "
                            "stage=export again")
        if modeling.file_sample_fingerprint(path) != fingerprint:
            raise UserError(f"{path} differs from the file stage=export wrote (truncated, or replaced by another "
                            "experiment's?); run stage=export again")


def check_export_target(target: Path, source: Path, experiment: bool) -> None:
    """export.dir may name a new folder, an empty one, or an earlier export (it holds export.json): never a file, a
    folder holding anything else, the folder the export is made from or one above it, nor a folder inside an
    experiment other than its own `export/` (a stage would replace it)."""
    resolved, source = target.resolve(), source.resolve()
    fix = f"choose a new or empty folder for export.dir (the default is {source / 'export'})" if experiment else \
        "choose a new or empty folder for export.dir"
    if resolved == source or resolved in source.parents:
        raise UserError(f"export.dir={target} holds {source}, which the export is made from: an export replaces "
                        f"its folder whole; {fix}")
    if source in resolved.parents and not (experiment and resolved == source / "export"):
        raise UserError(f"export.dir={target} is inside {source}, whose stages replace their folders; {fix}")
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"export.dir={target} is a file; {fix}")
    if resolved.is_dir() and not (resolved / EXPORT_FILE).is_file() and any(resolved.iterdir()):
        raise UserError(f"export.dir={target} holds files and is not an earlier export (no {EXPORT_FILE}): an export "
                        f"replaces only an earlier export; {fix}")


def keep_user_entries(target: Path, staging: Path) -> None:
    """Move what the user added to an earlier export (e.g. `wheels/`) into the new one before the swap."""
    if (target / EXPORT_FILE).is_file():
        for entry in target.iterdir():
            if entry.name not in EXPORT_ENTRIES and not entry.name.endswith(artifacts.TEMP_SUFFIX):
                os.replace(entry, staging / entry.name)


def restore_user_entries(staging: Path, target: Path) -> None:
    """Undo keep_user_entries when the swap failed, so the user's files stay in the old export."""
    if staging.is_dir() and target.is_dir():
        for entry in staging.iterdir():
            if entry.name not in EXPORT_ENTRIES and not (target / entry.name).exists():
                os.replace(entry, target / entry.name)


def export_failure(exc: OSError) -> str:
    """What went wrong, in words: a shutil.Error (copytree) carries its errors as (source, target, reason) rows."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        first = exc.args[0][0]
        return str(first[-1]) if isinstance(first, tuple) else str(first)
    return exc.strerror or str(exc)


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder's weights were saved in (config.json), fp32 when it does not say."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def copy_model_folder(source: Path, target: Path) -> None:
    """The base model's safetensors weights, config and tokenizer files (never a pickle)."""
    modeling.check_weights_folder(source, "*.safetensors", "config.json")
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith(".") and not any(
                path.match(p) for p in modeling.PICKLED_WEIGHTS):
            shutil.copy2(path, target / path.name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_card(record: dict[str, Any]) -> str:
    info, model = record["info"], record["model"]
    score = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    classifier = (f"the base model plus the {info['n_folds']} fold LoRA adapters, features averaged over their "
                  "passes" if info["mode"] == "adapters" else
                  "the fold adapters averaged and merged into the base weights, score head included")
    return "\n".join([
        f"# Pairwise preference classifier ({model.get('name')})", "",
        f"- base model: {model.get('path') or model.get('name')} ({model.get('source')}), formatting: max_length "
        f"{model.get('max_length')}, prompt share {model.get('prompt_max_fraction')}, truncation "
        f"{model.get('truncation_side')}, the tokenizer's own BOS" +
        (", each response's model named in its marker (rows need model_a / model_b)"
         if model.get("show_model_names") else ""),
        f"- classifier ({info['mode']}): {classifier}",
        f"- trained on {info.get('n_train_rows')} labelled pairs, {info['n_folds']} prompt-grouped folds",
        f"- out-of-fold log loss: head {score(info.get('finetune_oof_logloss'))}, stacker "
        f"{score(info.get('stack_oof_logloss'))}",
        f"- stage two: {', '.join(m for m in record['stack']['blend_members'])}, per fold in stack/fold_k/ (LightGBM "
        "text models, linear coefficients and PCA components as npz, blend weights in export.json)",
        f"- made by: {' '.join(info.get('made_by') or []) or 'stage=export'}", "",
        "```python", "from pipeline import Predictor", "predictor = Predictor.load(\"path/to/this/folder\")",
        "probs = predictor.predict_proba(test_df)   # Kaggle test layout: id, prompt, response_a, response_b",
        "```", ""])
