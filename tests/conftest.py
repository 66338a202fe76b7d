"""Shared fixtures: composed Hydra configs on the tiny random Llama, and one finished tiny experiment."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small and fast: 90 demo rows, 3 folds, a few optimizer steps per fold.
TINY_OVERRIDES = ["model=tiny", "data.demo.n_train=90", "data.demo.n_test=12", "cv.n_folds=3",
                  "finetune.per_device_batch_size=16", "finetune.save_steps=4", "stack.vectors.pca_components=4",
                  "stack.inner_folds=3"]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture
def tiny_cfg(tmp_path, model_cache):
    """A function returning a tiny-model config writing under this test's tmp dir."""
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        out = output_dir or tmp_path / "outputs"
        return compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}",
                            *overrides])
    return make


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory, model_cache):
    """One tiny experiment run through check -> finetune -> embed -> stack with the demo test file; tests read its
    artifacts."""
    from pipeline.stages import all as all_stage

    out = tmp_path_factory.mktemp("tiny_exp")
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}",
                       "exp_name=shared"])
    metrics = all_stage.run(cfg)
    return cfg, Path(cfg.paths.exp_dir), metrics
