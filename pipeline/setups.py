"""What each stage's results depend on, declared once: the settings that change results (hashed into every done-
marker and checked on reuse) versus the settings that only change how a run operates (free to differ)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import artifacts, inputs

# Settings that change how a run is operated, not what it computes: changing them keeps finished work valid.
# cache_prefix computes the same steps (tested: same loss and gradients), only faster; attn_implementation computes
# the same function (eager or a fused kernel: the training steps' rounding differs, as it does between devices, so a
# fold trained on a GPU stays valid where a CPU reads it).
FINETUNE_OPERATIONAL = ("logging_steps", "save_steps", "report_to", "dataloader_num_workers", "deepspeed", "folds",
                        "cache_prefix", "cache_prefix_max_gb", "teacher_workers", "attn_implementation")
EMBED_OPERATIONAL = ("batch_tokens", "padding_side", "max_batch_padding")
# Embed settings that change only the test features (never the OOF features or what the stacker learns from).
EMBED_TEST_ONLY = ("test_adapters",)
# Settings added after experiments were made, with the value that computes what those experiments computed: at that
# value a setting is left out of the hashes, so finished work stays valid; any other value is hashed as usual. A value
# that depends on the group's other settings is a function of them.
HARD_LABEL_LOSS = "pipeline.llm.losses.HardLabelCrossEntropy"
ADDED_LATER = {"finetune": {"train": True, "init_adapter": None, "teacher": None, "top_layers": None,
                            "attn_implementation": None,
                            "loss": lambda ft: {"_target_": HARD_LABEL_LOSS, "label_smoothing": ft["label_smoothing"]}},
               # max_batch_padding is operational (never hashed); its neutral value makes an experiment's recorded
               # config (an export, Predictor.load) batch rows as that experiment did: the same features, to the bit
               "embed": {"max_length": None, "lm_features": False, "merge_lora": False, "max_batch_padding": None},
               "model": {"show_model_names": False},
               "stack": {"pooling": "log_linear", "blend_robust": 0.0, "calibrate": False, "fallback_margin": None}}
# The same for each stack member's settings (stack.members.<name>.<key>).
MEMBER_ADDED_LATER = {"clip": False}


def with_added_settings(cfg: DictConfig) -> DictConfig:
    """A recorded config (an experiment's manifest, an export) from before some settings existed, completed with
    their neutral values: what that experiment computed without them."""
    for group, neutral in ADDED_LATER.items():
        if group in cfg:
            for key, value in neutral.items():
                if key not in cfg[group]:
                    cfg[group][key] = _neutral(value, OmegaConf.to_container(cfg[group], resolve=True))
    for member in (cfg.stack.get("members") or {}).values() if "stack" in cfg else ():
        with open_dict(member):
            for key, value in MEMBER_ADDED_LATER.items():
                if key not in member:
                    member[key] = value
    return cfg


def _neutral(value, settings: dict):
    return value(settings) if callable(value) else value


def _learned(cfg: DictConfig, group: str, operational: tuple[str, ...]) -> dict:
    neutral = ADDED_LATER.get(group, {})
    settings = OmegaConf.to_container(cfg[group], resolve=True)
    return {k: v for k, v in settings.items()
            if k not in operational and not (k in neutral and v == _neutral(neutral[k], settings))}


def finetune_settings(cfg: DictConfig) -> dict:
    """The model, formatting and fine-tune settings a fold's adapter depends on (hashed into its setup; recorded
    beside it so a mismatch can be told key by key)."""
    return {"model": _learned(cfg, "model", ()),
            "finetune": _learned(cfg, "finetune", FINETUNE_OPERATIONAL), "cv_group_by": cfg.cv.group_by}


def finetune_setup(cfg: DictConfig) -> dict:
    """What a finished fine-tune fold must agree with to be reused: seed, folds, train (and extra) file contents,
    the base model's weights (a fingerprint, see modeling.base_model_fingerprint) and the model, formatting and
    fine-tune settings."""
    init = cfg.finetune.get("init_adapter")
    # A warm start's weights by content (the path alone would not notice the adapter being retrained); absent
    # without one, so experiments made before the setting existed stay current.
    started_from = {"init_adapter": artifacts.file_fingerprint(Path(init) / "adapter_model.safetensors")} if init else {}
    # The teachers' weights or stacker by content too (absent without one, as for the warm start).
    teacher, unlabeled = cfg.finetune.get("teacher"), cfg.data.get("unlabeled")
    taught_by = {"teacher": [teacher_fingerprint(Path(str(p))) for p in ([teacher] if isinstance(teacher, str)
                                                                          else teacher)]} if teacher else {}
    if unlabeled:
        taught_by["unlabeled"] = artifacts.file_fingerprint(unlabeled)
    return {**started_from, **taught_by, **_common_setup(cfg)}


def teacher_fingerprint(path: Path) -> str:
    """What a distillation teacher (pipeline/teachers.py) is made of: its stage two's model.json, or its fold
    adapters' weights."""
    from pipeline.layout import MODEL_FILE

    files = [path / MODEL_FILE] if path.name == "stack" else \
        sorted(path.glob("finetune/fold_*/adapter/adapter_model.safetensors"))
    return artifacts.config_hash([artifacts.file_fingerprint(f) for f in files])


# What a finished fold carries in its adapter, so stages that only read it never need it again: the finetune
# settings, and the fingerprints its setup records of them (and of data.unlabeled's pseudo-labelled rows).
CARRIED_BY_THE_ADAPTER = ("init_adapter", "teacher")
CARRIED_FINGERPRINTS = (*CARRIED_BY_THE_ADAPTER, "unlabeled")


def as_trained(cfg: DictConfig, state: dict) -> DictConfig:
    """`cfg` with the warm start and the teachers a finished fold recorded: a stage that only reads the fold (embed,
    stack, predict, export, the Predictor) never reads them again (the fold's adapter carries them), so a start or
    teacher moved, deleted or left off the command line blocks nothing."""
    recorded = (state.get("settings") or {}).get("finetune", {})
    return OmegaConf.merge(cfg, {"finetune": {key: recorded.get(key) for key in CARRIED_BY_THE_ADAPTER}})


def finished_fold_setup(cfg: DictConfig, state: dict) -> dict:
    """What a reading stage checks a finished fold against: finetune_setup as the fold was trained (as_trained),
    with the start's and the teachers' fingerprints as the fold recorded them."""
    carried = {key: state[key] for key in CARRIED_FINGERPRINTS if key in state}
    return {**carried, **_common_setup(as_trained(cfg, state))}


def _as_recorded_before(cfg: DictConfig, group: str) -> DictConfig:
    """The group's node as the config hash has always read it (the hash input is its text, key order included),
    without the settings added later at their neutral values: finished experiments keep their hash."""
    neutral = ADDED_LATER.get(group, {})
    settings = OmegaConf.to_container(cfg[group], resolve=True)
    keep = [k for k in cfg[group] if not (k in neutral and settings[k] == _neutral(neutral[k], settings))]
    return OmegaConf.masked_copy(cfg[group], keep)


def _common_setup(cfg: DictConfig) -> dict:
    from pipeline.llm import modeling

    return {"seed": int(cfg.seed), "n_folds": int(cfg.cv.n_folds),
            "data": artifacts.file_fingerprint(inputs.data_paths(cfg).train),
            "extra": artifacts.file_fingerprint(cfg.data.extra),
            "base_model": modeling.base_model_fingerprint(modeling.base_model_dir(cfg.model,
                                                                                  cfg.paths.model_cache_dir)),
            "config_hash": finetune_config_hash(cfg)}


def finetune_config_hash(cfg: DictConfig) -> str:
    """The hash of the model, formatting and fine-tune settings a fold depends on. Its input is kept as it always
    was (tests/test_config.py pins its values for the shipped experiments), so finished experiments stay valid."""
    return artifacts.config_hash({"model": _as_recorded_before(cfg, "model"),
                                  "finetune": _learned(cfg, "finetune", FINETUNE_OPERATIONAL),
                                  "cv_group_by": cfg.cv.group_by})


def fit_setup(cfg: DictConfig) -> dict:
    """What a finished full-data fit (stage=fit) must agree with to be reused: the fine-tune setup without the
    folds (every row trains)."""
    return {k: v for k, v in finetune_setup(cfg).items() if k != "n_folds"}


def embed_setup(cfg: DictConfig, finetune_state: dict) -> dict:
    """What finished embed folds must agree with: the adapters they read (the finetune setup, which covers the
    model, formatting and data), and every result-changing embed setting."""
    return {"seed": int(cfg.seed), "finetune": finetune_state["config_hash"], "data": finetune_state["data"],
            "config_hash": artifacts.config_hash(_learned(cfg, "embed", EMBED_OPERATIONAL + EMBED_TEST_ONLY))}


def test_setup(cfg: DictConfig, finetune_state: dict) -> dict:
    """What a test file's features depend on: the embed setup plus how the fold adapters score it."""
    return {**embed_setup(cfg, finetune_state), **{key: cfg.embed[key] for key in EMBED_TEST_ONLY}}


def stack_setup(cfg: DictConfig) -> dict:
    """Every setting that decides what the stacker learned from; stage=predict must run with the same."""
    return {"model": _learned(cfg, "model", ()),
            "embed": _learned(cfg, "embed", EMBED_OPERATIONAL + EMBED_TEST_ONLY),
            "cv": OmegaConf.to_container(cfg.cv, resolve=True), "seed": int(cfg.seed),
            "data": artifacts.file_fingerprint(inputs.data_paths(cfg).train)}
