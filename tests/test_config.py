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


@pytest.mark.parametrize("group", ["paths", "data", "model", "cv", "finetune", "embed", "stack", "experiment"])
def test_every_option_composes(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        cfg = compose_resolved([f"{group}={option}"])
        assert cfg.stage == "all"
        assert set(cfg) >= {"paths", "data", "model", "cv", "finetune", "embed", "stack", "seed", "exp_name"}


def test_defaults_and_contract_keys():
    cfg = compose_resolved([])
    assert cfg.model.source == "gguf_package" and cfg.exp_name == "default"
    assert cfg.paths.exp_dir == "outputs/default"
    assert cfg.data.train is None and cfg.data.test is None
    cfg = compose_resolved(["exp_name=x", "paths.output_dir=/o", "cv.n_folds=7", "seed=3", "model.path=/m"])
    assert cfg.paths.exp_dir == "/o/x" and cfg.cv.n_folds == 7 and cfg.seed == 3 and cfg.model.path == "/m"


@pytest.mark.parametrize("preset", ["llama3_8b", "gemma2_9b", "qwen2_7b"])
def test_gpu_presets_are_real_settings(preset):
    cfg = compose_resolved([f"model={preset}"])
    assert cfg.model.quantization == "4bit" and cfg.model.precision == "bf16"
    assert cfg.model.gradient_checkpointing and 1024 <= cfg.model.max_length <= 2048
    assert cfg.model.arch.hidden_size >= 3072 and cfg.model.path


def test_experiment_states_only_changes():
    base = compose_resolved([])
    smoke = compose_resolved(["experiment=smoke"])
    assert smoke.model.source == "tiny" and smoke.exp_name == "smoke"
    assert smoke.finetune.lora == base.finetune.lora


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
