"""The experiment folder, in one place: every path, file name and state key the stages read or write.

    outputs/<exp_name>/
      folds.parquet                  id -> fold, assigned once (cv.n_folds, cv.group_by, seed)
      metrics.json                   one entry per stage (the public contract: README "Artifacts")
      manifests/<stage>.json         how each stage was run (config, versions, commit, argv)
      submission.csv                 with a test file
      finetune/fold_k/               state.json, adapter/ (LoRA + head), oof.parquet, checkpoints/ while training
      finetune/averaged/adapter/     the fold adapters averaged into one (embed.test_adapters=averaged)
      finetune/oof.parquet           the head's OOF probabilities, train-file order
      fit/                           state.json, adapter/ (stage=fit: one adapter on every train row, no folds)
      embed/fold_k/                  state.json, train.parquet (fold k's OOF features)
      embed/train_features.parquet   every fold's OOF features, train-file order; embed/manifest.json
      embed/test_<file>_<setup>/     fold_k.parquet per fold adapter (or averaged.parquet), features.parquet, manifest.json
      stack/                         state.json, model.json, oof.parquet, report.md, fold_k/ member models
      tracking/<stage>/              TensorBoard events when finetune.report_to has tensorboard (Trainer: finetune/fold_k)

A folder's `state.json` says whether its work is finished (`done`) and with which setup (the keys of
`setups.*_setup`, plus what the fold records: see FinetuneFoldRecord / EmbedFoldRecord). Work is reused only when
`done` is true and every setup key agrees.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

STATE_FILE = "state.json"
DONE = "done"
METRICS_FILE = "metrics.json"
FOLDS_FILE = "folds.parquet"
SUBMISSION = "submission.csv"
MODEL_FILE = "model.json"
MANIFEST = "manifest.json"
TRAIN_FEATURES = "train_features.parquet"
TEST_FEATURES = "features.parquet"
OOF = "oof.parquet"
REPORT = "report.md"


@dataclass(frozen=True)
class Layout:
    """Paths of one experiment folder (`paths.exp_dir`)."""

    root: Path

    @classmethod
    def of(cls, cfg: DictConfig) -> "Layout":
        return cls(Path(cfg.paths.exp_dir))

    # experiment level
    @property
    def folds(self) -> Path:
        return self.root / FOLDS_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    def manifest(self, stage: str) -> Path:
        return self.root / "manifests" / f"{stage}.json"

    @property
    def submission(self) -> Path:
        return self.root / SUBMISSION

    def tracking(self, stage: str) -> Path:
        return self.root / "tracking" / stage

    # finetune
    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    def finetune_fold(self, k: int) -> Path:
        return self.finetune / f"fold_{k}"

    def adapter(self, k: int) -> Path:
        return self.finetune_fold(k) / "adapter"

    def checkpoints(self, k: int) -> Path:
        return self.finetune_fold(k) / "checkpoints"

    def fold_oof(self, k: int) -> Path:
        return self.finetune_fold(k) / OOF

    @property
    def finetune_oof(self) -> Path:
        return self.finetune / OOF

    @property
    def averaged_adapter(self) -> Path:
        return self.finetune / "averaged" / "adapter"

    # fit (one adapter on every row)
    @property
    def fit(self) -> Path:
        return self.root / "fit"

    @property
    def fit_adapter(self) -> Path:
        return self.fit / "adapter"

    # embed
    @property
    def embed(self) -> Path:
        return self.root / "embed"

    def embed_fold(self, k: int) -> Path:
        return self.embed / f"fold_{k}"

    def fold_features(self, k: int) -> Path:
        return self.embed_fold(k) / "train.parquet"

    @property
    def train_features(self) -> Path:
        return self.embed / TRAIN_FEATURES

    @property
    def embed_manifest(self) -> Path:
        return self.embed / MANIFEST

    def test_folder(self, test_fingerprint: str, setup_hash: str) -> Path:
        """Test features live per test file and embed setup: scoring a new file never disturbs older ones."""
        return self.embed / f"test_{test_fingerprint}_{setup_hash[:8]}"

    def shard_folder(self, job: str) -> Path:
        """Where ranks leave their share of one pass before rank 0 gathers it (removed afterwards)."""
        return self.embed / "shards" / job

    # stack
    @property
    def stack(self) -> Path:
        return self.root / "stack"


def test_fold_features(folder: Path, k: int | None) -> Path:
    """One adapter's test features in a test folder: fold k's, or the averaged adapter's (k=None)."""
    return folder / ("averaged.parquet" if k is None else f"fold_{k}.parquet")


@dataclass
class FinetuneFoldRecord:
    """What finetune/fold_k/state.json records besides the setup once the fold is done."""

    fold: int
    train_folds: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # what the setup's config_hash was made from

    def as_state(self, setup: dict) -> dict:
        return {**setup, **asdict(self)}


@dataclass
class EmbedFoldRecord:
    """What embed/fold_k/state.json records besides the setup: which adapter scored the fold, which folds that
    adapter trained on (the leak check reads these), and which rank scored how many rows."""

    fold: int
    adapter: str
    adapter_train_folds: list[int]
    n_train_rows: int
    seconds: float
    ranks: list[dict[str, int]] = field(default_factory=list)

    def as_state(self, setup: dict) -> dict:
        return {**setup, **asdict(self), "scored_fold": self.fold}
