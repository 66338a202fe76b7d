"""Config composition: every group option, experiment, launcher and sweeper composes and resolves."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF_DIR

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_resolved(overrides: list[str], return_hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra)
    OmegaConf.resolve(cfg) if not return_hydra else None
    return cfg


def leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a nested dict (a list is one leaf)."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}


def file_settings(group: str, option: str) -> tuple[dict[str, object], list[str]]:
    """A config file's own settings (dotted keys relative to the config root) and the group overrides its
    defaults list makes (e.g. model=tiny, or experiment=shared_ties for an experiment built on another)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    defaults = raw.pop("defaults", []) or []
    overrides = [f"{k.removeprefix('override /')}={v}" for d in defaults if isinstance(d, dict) for k, v in d.items()
                 if k.startswith("override /")]
    overrides += [f"{group}={d}" for d in defaults if isinstance(d, str) and d != "_self_"]
    prefix = "" if group == "experiment" else f"{group}."
    return {f"{prefix}{k}": v for k, v in leaves(raw).items()}, overrides


def composed_leaves(overrides: list[str]) -> dict[str, object]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return leaves(OmegaConf.to_container(cfg, resolve=False))


@pytest.mark.parametrize("group", ["paths", "data", "model", "cv", "finetune", "embed", "stack", "experiment"])
def test_every_option_composes_with_its_own_settings(group):
    """Every option of every group composes, resolves, and its file's settings are what the config then holds
    (in every subtree it touches, not only one)."""
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        compose_resolved([f"{group}={option}"])
        composed = composed_leaves([f"{group}={option}"])
        own, _ = file_settings(group, option)
        wrong = {k: (v, composed.get(k, "<missing>")) for k, v in own.items() if composed.get(k, "<missing>") != v}
        assert not wrong, f"conf/{group}/{option}.yaml settings not in the composed config: {wrong}"


def test_defaults_and_contract_keys():
    cfg = compose_resolved([])
    assert cfg.model.source == "gguf_package" and cfg.exp_name == "default"
    assert cfg.paths.exp_dir == "outputs/default"
    assert cfg.data.train is None and cfg.data.test is None
    cfg = compose_resolved(["exp_name=x", "paths.output_dir=/o", "cv.n_folds=7", "seed=3", "model.path=/m"])
    assert cfg.paths.exp_dir == "/o/x" and cfg.cv.n_folds == 7 and cfg.seed == 3 and cfg.model.path == "/m"


@pytest.mark.parametrize("preset", ["llama3_8b", "gemma2_9b", "qwen2_7b"])
def test_gpu_presets_arch_is_a_real_transformers_config(preset):
    """A preset's `arch` builds that family's transformers config (its model_type is known, every field is one the
    config class takes) whose attention heads divide the hidden size: a typo fails here, not on a rented GPU."""
    from transformers import AutoConfig

    cfg = compose_resolved([f"model={preset}"])
    arch = OmegaConf.to_container(cfg.model.arch)
    config = AutoConfig.for_model(**arch)
    assert config.model_type == arch["model_type"]
    for key, value in arch.items():
        assert getattr(config, key) == value, key
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.num_attention_heads % config.num_key_value_heads == 0


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_states_only_changes(experiment):
    """An experiment file states only what it changes: each of its settings differs from what the config would
    hold without it, and nothing it does not name changes (apart from the groups its defaults list swaps)."""
    own, group_overrides = file_settings("experiment", experiment)
    base = composed_leaves(group_overrides)
    composed = composed_leaves([f"experiment={experiment}"])
    restated = [k for k, v in own.items() if base.get(k, "<missing>") == v]
    assert not restated, f"experiment/{experiment}.yaml restates defaults: {restated}"
    changed = {k for k in set(base) | set(composed) if base.get(k) != composed.get(k)}
    assert changed <= set(own), f"experiment/{experiment}.yaml changes keys it does not name: {changed - set(own)}"


@pytest.mark.parametrize("experiment", [None, *options("experiment")])
def test_every_target_of_every_experiment_instantiates(experiment):
    """Every `_target_` an experiment composes (the LoRA config, every stage-two member's estimator) builds, and
    the stage-two spec builds from it, as lightning-hydra-template's config tests do."""
    from hydra.utils import instantiate

    from pipeline.stage_two.spec import StackSpec

    cfg = compose_resolved([] if experiment is None else [f"experiment={experiment}"])
    targets = 0
    def visit(node):
        nonlocal targets
        if OmegaConf.is_dict(node):
            if "_target_" in node:
                assert instantiate(node, _convert_="all") is not None
                targets += 1
            for value in node.values():
                visit(value)
    visit(cfg)
    assert targets >= 1 + len(cfg.stack.members) - 1  # the LoRA config and every member but the pass-through head
    spec = StackSpec.from_config(cfg.stack, cfg.seed)
    assert [m.name for m in spec.members] == list(cfg.stack.blend_members)


@pytest.mark.parametrize("launcher", ["local_parallel", "slurm"])
def test_launchers_compose(launcher):
    cfg = compose_resolved([f"hydra/launcher={launcher}"], return_hydra=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_optuna_sweeper_composes():
    cfg = compose_resolved(["hparams_search=stack_optuna"], return_hydra=True)
    assert cfg.stage == "stack"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert "stack.vectors.pca_components" in cfg.hydra.sweeper.params


def test_settings_added_later_keep_older_experiments_current(tmp_path, model_cache):
    """At their neutral values the settings added later (setups.ADDED_LATER: embed.max_length, finetune.train,
    finetune.teacher, model.show_model_names, ...) change no setup hash, and a recorded config without them reads as
    having them. (Demo data and the tiny model go to this test's folders, not ./outputs or the user's cache.)"""
    from pipeline import setups

    paths = [f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}"]
    cfg = compose_resolved(["model=tiny", *paths])
    older = OmegaConf.create(OmegaConf.to_container(cfg))
    for group, keys in setups.ADDED_LATER.items():
        for key in keys:
            del older[group][key]
    assert setups.finetune_setup(older)["config_hash"] == setups.finetune_setup(cfg)["config_hash"]
    assert setups.embed_setup(older, {"config_hash": "f", "data": "d"}) == \
        setups.embed_setup(cfg, {"config_hash": "f", "data": "d"})
    assert setups.stack_setup(older) == setups.stack_setup(cfg)
    completed = setups.with_added_settings(older)
    assert completed.embed.max_length is None and completed.finetune.train is True
    assert completed.finetune.top_layers is None  # an older experiment trained every layer
    assert completed.embed.max_batch_padding is None  # batched as before: an old export scores to the bit
    changed = compose_resolved(["model=tiny", "embed.max_length=512", *paths])
    assert setups.embed_setup(changed, {"config_hash": "f", "data": "d"}) != \
        setups.embed_setup(cfg, {"config_hash": "f", "data": "d"})


# The fine-tune config hash of each shipped setup as every earlier version computed it (measured with the code of
# 7d8beb3): a finished fold records it, so a change here would call every finished experiment "made with a
# different setup".
RECORDED_FINETUNE_HASHES = {"": "8de3153269ed9fc1", "experiment=smoke": "7a23d6ebdb56ba7c",
                            "experiment=shared_ties": "8b0e8eeb29df8687", "experiment=shared_frozen": "e4cfec5691ad9d99",
                            "experiment=llama3_8b_qlora": "96246e51ed144619", "model=tiny": "efca5c86798a9eae"}


@pytest.mark.parametrize("override", list(RECORDED_FINETUNE_HASHES))
def test_finished_experiments_keep_their_finetune_hash(override):
    from pipeline import setups

    cfg = compose_resolved([override] if override else [])
    assert setups.finetune_config_hash(cfg) == RECORDED_FINETUNE_HASHES[override]
