"""Every setting checked in one place, before any file is read or model loaded: each stage (stage=check too)
starts here, so a bad value is one `error:` line that names the key and says what it takes."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from pipeline import embed_passes
from pipeline.feature_table import produced_inputs
from pipeline.llm import modeling, warm_start
from pipeline.errors import UserError, require_int, require_number
from pipeline.formatting import TRUNCATION_SIDES
from pipeline.predictor import EXPORT_MODES
from pipeline.stage_two.spec import StackSpec


# The stages that load the model: only they need the hardware a setting asks for (stage=check plans for a GPU
# from a CPU machine; stage=stack re-scores features made on a GPU).
LOADS_MODEL = ("finetune", "embed", "predict", "all", "export", "fit")


def validate_model(model_cfg: DictConfig, loads_model: bool = True) -> None:
    modeling.validate(model_cfg, loads_model)
    if model_cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"model.precision={model_cfg.precision}: use auto, bf16, fp16 or fp32")
    require_int(model_cfg.max_length, "model.max_length", 16)
    require_number(model_cfg.prompt_max_fraction, "model.prompt_max_fraction", 0.0, 1.0)
    if not isinstance(model_cfg.get("show_model_names", False), bool):
        raise UserError(f"model.show_model_names={model_cfg.show_model_names}: use true or false")
    if model_cfg.truncation_side not in TRUNCATION_SIDES:
        raise UserError(f"model.truncation_side={model_cfg.truncation_side}: use one of {', '.join(TRUNCATION_SIDES)}")
    if model_cfg.path:
        path = Path(str(model_cfg.path))
        looks_local = path.is_absolute() or str(model_cfg.path).startswith((".", "~")) or path.exists()
        if looks_local and not (path / "config.json").is_file():
            raise UserError(f"model.path={model_cfg.path}: no model there (a folder with config.json is expected); "
                            "point it at a saved HF model folder")


# The stages that train (and read finetune.init_adapter): the others use finished folds, which already carry the
# warm start, so a moved or deleted start never blocks them.
TRAINS = ("check", "finetune", "all", "fit")


def validate_finetune(ft: DictConfig, n_folds: int, stage: str, model_names: bool = False) -> None:
    require_int(ft.per_device_batch_size, "finetune.per_device_batch_size", 1)
    require_int(ft.gradient_accumulation_steps, "finetune.gradient_accumulation_steps", 1)
    require_number(ft.learning_rate, "finetune.learning_rate", 1e-12)
    if ft.head_learning_rate is not None:
        require_number(ft.head_learning_rate, "finetune.head_learning_rate", 1e-12)
    require_number(ft.label_smoothing, "finetune.label_smoothing", 0.0, 1.0)
    validate_loss(ft)
    validate_teacher(ft, stage, model_names)
    if ft.max_steps in (None, -1) or ft.max_steps <= 0:
        require_number(ft.epochs, "finetune.epochs", 1e-9)
    if not isinstance(ft.train, bool):
        raise UserError(f"finetune.train={ft.train}: use true (fine-tune) or false (the frozen-feature path)")
    if ft.init_adapter and stage in TRAINS:
        warm_start.check_init_adapter(Path(str(ft.init_adapter)), ft.lora)
    if stage == "fit" and not ft.train:
        raise UserError("stage=fit with finetune.train=false would record an untrained adapter as a finished fit; "
                        "drop finetune.train=false (the frozen-feature path is a stage=all / finetune setting)")
    attention = ft.get("attn_implementation")
    if attention is not None and not (isinstance(attention, str) and attention.strip()):
        raise UserError(f"finetune.attn_implementation={attention}: use auto, null (model.attn_implementation) or an "
                        "attention implementation's name, e.g. eager or sdpa")
    if ft.head_init not in ("random", "verdict_tokens"):
        raise UserError(f"finetune.head_init={ft.head_init}: use random or verdict_tokens")
    if ft.folds is not None:
        bad = [k for k in ft.folds if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_folds]
        if bad:
            raise UserError(f"finetune.folds={list(ft.folds)}: {bad} are not folds of cv.n_folds={n_folds}")


def validate_loss(ft: DictConfig) -> None:
    """finetune.loss builds a training loss; TrainingArguments' own label smoothing would be ignored beside it."""
    from hydra.errors import InstantiationException

    from pipeline.llm.losses import TEACHER_PROBS, TrainingLoss

    if "label_smoothing_factor" in ft.training_args:
        raise UserError("finetune.training_args.label_smoothing_factor: the loss comes from finetune.loss; set "
                        "finetune.label_smoothing instead (same numbers)")
    target = ft.loss.get("_target_") if isinstance(ft.loss, DictConfig) else None
    if not target:
        raise UserError(f"finetune.loss={ft.loss}: give a loss with its _target_, e.g. "
                        "{_target_: pipeline.llm.losses.HardLabelCrossEntropy, label_smoothing: 0.1}")
    try:
        from pipeline.llm.training import training_loss

        loss = training_loss(ft)
    except InstantiationException as error:
        raise UserError(f"finetune.loss: {target} could not be built: {str(error).splitlines()[-1]}") from None
    if not isinstance(loss, TrainingLoss):
        raise UserError(f"finetune.loss._target_={target} is not a training loss (pipeline.llm.losses.TrainingLoss)")
    teacher = ft.get("teacher")
    if TEACHER_PROBS in loss.targets and not teacher:
        raise UserError(f"finetune.loss={target} trains on a teacher's probabilities: set finetune.teacher=PATH (a "
                        "finished experiment, or its stage two: outputs/NAME/stack)")
    if teacher and TEACHER_PROBS not in loss.targets:
        raise UserError(f"finetune.teacher={teacher} with finetune.loss={target}, which reads no teacher targets: add "
                        "finetune/loss=distill")


def validate_teacher(ft: DictConfig, stage: str, model_names: bool) -> None:
    """finetune.teacher: one path or a list of them, each a finished experiment or its stage two; only for a
    fold fine-tune that trains (a full-data fit has no fold to keep the teacher's labels out of), and for a student
    that never sees model names."""
    from pipeline import teachers

    teacher = ft.get("teacher")
    require_int(ft.get("teacher_workers", 0), "finetune.teacher_workers", 0)
    if teacher is None:
        return
    listed = [teacher] if isinstance(teacher, str) else list(teacher) if isinstance(teacher, ListConfig) else None
    if not listed or not all(isinstance(p, str) and p for p in listed):
        raise UserError(f"finetune.teacher={teacher}: give a path (outputs/NAME or outputs/NAME/stack) or a list of them")
    if not ft.train:
        raise UserError("finetune.teacher with finetune.train=false: the frozen-feature path takes no training step, "
                        "so nothing would learn from the teacher; drop one of them")
    if model_names:
        raise UserError("finetune.teacher with model.show_model_names=true: a student never sees the model names (the "
                        "rows it will score have none); show them to the teacher only")
    if stage == "fit":
        raise UserError("stage=fit with finetune.teacher: distillation keeps each fold's targets free of that fold's "
                        "labels, and a full-data fit has no folds; train students with stage=finetune / all")
    if stage in TRAINS:
        for path in teachers.teacher_paths(ft):
            teachers.resolve(path)


def validate_lora_layers(ft: DictConfig, depth: int | None = None) -> None:
    """finetune.top_layers and finetune.lora.layers_to_transform, as far as they can be told without (or, with
    `depth`, with) the model: one way of choosing the layers, layers inside its depth, and a list of target modules
    beside layers_to_transform (peft takes no string there; top_layers turns all-linear into the list itself)."""
    layers = ft.lora.get("layers_to_transform")
    targets = ft.lora.get("target_modules")
    if ft.top_layers is not None:
        require_int(ft.top_layers, "finetune.top_layers", 1)
        if layers is not None:
            raise UserError(f"finetune.top_layers={ft.top_layers} and finetune.lora.layers_to_transform={layers} both "
                            "choose the trained layers: set finetune.top_layers=null to list them yourself")
        if isinstance(targets, str) and targets != modeling.ALL_LINEAR:
            raise UserError(f"finetune.top_layers={ft.top_layers} with finetune.lora.target_modules={targets}: use "
                            f"{modeling.ALL_LINEAR} or a list of modules, e.g. [q_proj, k_proj, v_proj, o_proj] (or "
                            "finetune.top_layers=null to train every layer)")
    if layers is None:
        return
    listed = [layers] if isinstance(layers, int) else list(layers)
    bad = [x for x in listed if isinstance(x, bool) or not isinstance(x, int) or x < 0 or (depth and x >= depth)]
    if bad:
        bound = f"0..{depth - 1} (the model has {depth} layers)" if depth else "layer numbers >= 0"
        raise UserError(f"finetune.lora.layers_to_transform={listed}: {bad} are not layers of this model; use {bound}")
    if isinstance(targets, str):
        raise UserError(f"finetune.lora.layers_to_transform with finetune.lora.target_modules={targets}: "
                        "layers_to_transform needs a list of modules, e.g. [q_proj, k_proj, v_proj, o_proj] "
                        "(or choose the top layers with finetune.top_layers=N, which takes all-linear)")


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
    n_folds = require_int(cfg.cv.n_folds, "cv.n_folds", 2)
    if not isinstance(cfg.cv.group_by, str) or not cfg.cv.group_by:
        raise UserError(f"cv.group_by={cfg.cv.group_by}: use prompt or the name of a column of the train file")
    require_int(cfg.seed, "seed", 0)
    validate_model(cfg.model, cfg.stage in LOADS_MODEL)
    validate_finetune(cfg.finetune, n_folds, cfg.stage, bool(cfg.model.get("show_model_names")))
    if cfg.data.get("unlabeled") is not None and not cfg.finetune.get("teacher"):
        raise UserError(f"data.unlabeled={cfg.data.unlabeled}: unlabeled rows train only on a teacher's probabilities; "
                        "set finetune.teacher=PATH and finetune/loss=distill")
    embed_passes.validate(cfg.embed)
    if cfg.embed.test_adapters == "averaged" and cfg.finetune.lora.get("use_dora"):
        raise UserError("embed.test_adapters=averaged with finetune.lora.use_dora=true: DoRA adapters cannot be "
                        "averaged exactly; use embed.test_adapters=each")
    spec = StackSpec.from_config(cfg.stack, cfg.seed)  # every member's estimator built once
    spec.check_inputs(produced_inputs(cfg.embed), "these embed settings")
    validate_lora_layers(cfg.finetune)
    memory_gb = cfg.check.gpu_memory_gb
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
        raise UserError(f"check.gpu_memory_gb={memory_gb}: give the GPU's memory in GB, a number > 0 (e.g. 24 or 80)")
    if cfg.export.model not in EXPORT_MODES:
        raise UserError(f"export.model={cfg.export.model}: use {' or '.join(EXPORT_MODES)}")
