"""Every setting checked in one place, before any file is read or model loaded: each stage (stage=check too)
starts here, so a bad value is one `error:` line that names the key and says what it takes."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline import extraction, modeling
from pipeline.errors import UserError
from pipeline.features import VECTOR_BLOCKS


def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}={value}: must be a whole number >= {minimum}")
    return value


def _number(value, key: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or \
            (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise UserError(f"{key}={value}: must be a number {bound}")
    return float(value)


def validate_model(model_cfg: DictConfig) -> None:
    modeling.validate(model_cfg)
    if model_cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"model.precision={model_cfg.precision}: use auto, bf16, fp16 or fp32")
    _int(model_cfg.max_length, "model.max_length", 16)
    _number(model_cfg.prompt_max_fraction, "model.prompt_max_fraction", 0.0, 1.0)
    if model_cfg.truncation_side not in ("left", "right"):
        raise UserError(f"model.truncation_side={model_cfg.truncation_side}: use left or right")
    if model_cfg.path:
        path = Path(str(model_cfg.path))
        looks_local = path.is_absolute() or str(model_cfg.path).startswith((".", "~")) or path.exists()
        if looks_local and not (path / "config.json").is_file():
            raise UserError(f"model.path={model_cfg.path}: no model there (a folder with config.json is expected); "
                            "point it at a saved HF model folder")


def validate_finetune(ft: DictConfig, n_folds: int) -> None:
    _int(ft.per_device_batch_size, "finetune.per_device_batch_size", 1)
    _int(ft.gradient_accumulation_steps, "finetune.gradient_accumulation_steps", 1)
    _number(ft.learning_rate, "finetune.learning_rate", 1e-12)
    if ft.head_learning_rate is not None:
        _number(ft.head_learning_rate, "finetune.head_learning_rate", 1e-12)
    _number(ft.label_smoothing, "finetune.label_smoothing", 0.0, 1.0)
    if ft.max_steps in (None, -1) or ft.max_steps <= 0:
        _number(ft.epochs, "finetune.epochs", 1e-9)
    if ft.head_init not in ("random", "verdict_tokens"):
        raise UserError(f"finetune.head_init={ft.head_init}: use random or verdict_tokens")
    if ft.folds is not None:
        bad = [k for k in ft.folds if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_folds]
        if bad:
            raise UserError(f"finetune.folds={list(ft.folds)}: {bad} are not folds of cv.n_folds={n_folds}")


def validate_stack(stack: DictConfig) -> None:
    _int(stack.inner_folds, "stack.inner_folds", 2)
    _int(stack.vectors.pca_components, "stack.vectors.pca_components", 0)
    _number(stack.blend_l2, "stack.blend_l2", 0.0)
    _number(stack.select_z, "stack.select_z", 0.0)
    if not stack.blend_members:
        raise UserError("stack.blend_members is empty: name at least one of stack.members")
    missing = [m for m in stack.blend_members if m not in stack.members]
    if missing:
        raise UserError(f"stack.blend_members names {missing}, which stack.members does not define "
                        f"(have {', '.join(stack.members)})")
    bad = [k for k in stack.vectors.kinds if k not in VECTOR_BLOCKS]
    if bad:
        raise UserError(f"stack.vectors.kinds: unknown {bad}; choose from {', '.join(VECTOR_BLOCKS)}")
    bad = [o for o in stack.vectors.orientations if o not in ("fwd", "swp")]
    if bad or not stack.vectors.orientations:
        raise UserError(f"stack.vectors.orientations={list(stack.vectors.orientations)}: use fwd and/or swp")
    if stack.vectors.source not in ("finetuned", "base"):
        raise UserError(f"stack.vectors.source={stack.vectors.source}: use finetuned or base")


def validate_paths(cfg: DictConfig) -> None:
    """exp_name names a folder inside paths.output_dir: never the output folder itself or a place outside it
    (artifacts, and the cleanup of dead writers' temp files, stay inside the experiment)."""
    name = cfg.exp_name
    if not isinstance(name, str) or name.strip() in ("", ".", "..") or any(sep in name for sep in ("/", "\\")) \
            or name != name.strip():
        raise UserError(f"exp_name={name!r}: use a plain folder name (letters, digits, - _ .), no path separators, "
                        "not . or ..")
    output, exp = Path(cfg.paths.output_dir).resolve(), Path(cfg.paths.exp_dir).resolve()
    if output not in exp.parents:
        raise UserError(f"paths.exp_dir={cfg.paths.exp_dir} is not inside paths.output_dir={cfg.paths.output_dir}; "
                        "set paths.output_dir to the folder holding the experiment and exp_name to its name")


def validate(cfg: DictConfig) -> None:
    """The whole config a stage will run with."""
    validate_paths(cfg)
    n_folds = _int(cfg.cv.n_folds, "cv.n_folds", 2)
    if not isinstance(cfg.cv.group_by, str) or not cfg.cv.group_by:
        raise UserError(f"cv.group_by={cfg.cv.group_by}: use prompt or the name of a column of the train file")
    _int(cfg.seed, "seed", 0)
    validate_model(cfg.model)
    validate_finetune(cfg.finetune, n_folds)
    extraction.validate(cfg.embed)
    if cfg.embed.test_adapters == "averaged" and cfg.finetune.lora.get("use_dora"):
        raise UserError("embed.test_adapters=averaged with finetune.lora.use_dora=true: DoRA adapters cannot be "
                        "averaged exactly; use embed.test_adapters=each")
    validate_stack(cfg.stack)
