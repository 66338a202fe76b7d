"""The one contract between the two halves: the feature table the LLM half writes (finetune at each fold's end,
embed for what is missing) and stage two reads. This module owns its format, its column names, its row order,
the leak check and the public OOF loader; it imports no torch.

Columns (embed/fold_k/train.parquet, embed/train_features.parquet, test feature files), scalars `id`, `fold`
(and `label`, `rank`) plus fixed-width vector columns:
- `head`: head probabilities of the original pass; `head_swapped`: of the swapped pass, mirrored back into the
  original A/B orientation (equal to `head` without swap TTA).
- `{layer}_{span}_{orientation}`: layer = `h050` (half depth) ... `h100` (the head's input), span = prompt / a /
  b / verdict (a and b name response_a and response_b, whatever slot they sat in), orientation = fwd (prompt|A|B)
  or swp (prompt|B|A, only with swap TTA; there response_a sees response_b).
- `lm_{span}_{orientation}` (embed.lm_features): the LM's mean token log-likelihood and entropy of the span.
- `base_...`: the same vectors (and likelihoods) from the base model with the adapter disabled (embed.base_vectors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from pipeline import artifacts, layout, setups
from pipeline.errors import UserError
from pipeline.layout import Layout

if TYPE_CHECKING:
    from pipeline.context import RunContext

STORAGE_DTYPES = ("float16", "float32")
HEAD, HEAD_SWAPPED = "head", "head_swapped"   # the head's columns

SPANS = ("prompt", "a", "b", "verdict")    # what a pass pools (inference.forward_pass)
ORIENTATIONS = ("fwd", "swp")               # prompt|A|B, and prompt|B|A with swap TTA
BASE_PREFIX = "base_"                       # vectors of the base model with the adapter disabled
# The LM's own view of each span (embed.lm_features): stored like vectors, as `[base_]lm_{span}_{orientation}`
# columns of width 2 (mean token log-likelihood, mean entropy), so they mirror under a swap the same way.
LM_LAYER = "lm"
LM_SPANS = ("prompt", "a", "b")
LM_STATS = ("loglik", "entropy")


@dataclass(frozen=True)
class VectorKey:
    """The name of one pooled-vector column, `[base_]{layer}_{span}_{orientation}` (e.g. `h050_a_fwd`), as one
    type: parsed, formatted and mirrored here only. Parsing matches the span against the known spans, so layer and
    span names may themselves contain `_`."""

    layer: str
    span: str
    orientation: str
    base: bool = False

    @classmethod
    def parse(cls, key: str, spans: Sequence[str] = SPANS) -> "VectorKey":
        base = key.startswith(BASE_PREFIX)
        rest = key[len(BASE_PREFIX):] if base else key
        stem, _, orientation = rest.rpartition("_")
        span = next((s for s in sorted(spans, key=len, reverse=True) if stem.endswith(f"_{s}")), None)
        if orientation not in ORIENTATIONS or span is None or len(stem) <= len(span) + 1:
            raise ValueError(f"{key!r} is not a vector column ([base_]LAYER_SPAN_ORIENTATION with a span of "
                             f"{', '.join(spans)} and an orientation of {', '.join(ORIENTATIONS)})")
        return cls(stem[: -len(span) - 1], span, orientation, base)

    @classmethod
    def is_vector(cls, key: str, spans: Sequence[str] = SPANS) -> bool:
        try:
            cls.parse(key, spans)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"{BASE_PREFIX if self.base else ''}{self.layer}_{self.span}_{self.orientation}"

    def mirrored(self) -> "VectorKey":
        """The key holding the same vector for the A/B-swapped pair: response a <-> b and orientation fwd <-> swp
        (the swapped pair's forward pass is this pair's swapped pass)."""
        return VectorKey(self.layer, {"a": "b", "b": "a"}.get(self.span, self.span),
                         "swp" if self.orientation == "fwd" else "fwd", self.base)

    def oriented(self, orientation: str) -> "VectorKey":
        return VectorKey(self.layer, self.span, orientation, self.base)


@dataclass
class PassFeatures:
    """What the scoring passes give for a set of rows, typed: the head's probabilities of both orientations, the
    pooled vectors and the LM likelihoods (each keyed by its VectorKey name)."""

    head: np.ndarray                    # (n, 3) the original orientation's pass
    head_swapped: np.ndarray            # (n, 3) the swapped pass mirrored back (= head without swap TTA)
    vectors: dict[str, np.ndarray]      # "[base_]{layer}_{span}_{orientation}" -> (n, hidden)
    likelihoods: dict[str, np.ndarray]  # "[base_]lm_{span}_{orientation}" -> (n, len(LM_STATS))

    @classmethod
    def from_columns(cls, matrices: dict[str, np.ndarray]) -> "PassFeatures":
        """A feature table's vector columns (see the module docstring) as one object."""
        named = {name: m for name, m in matrices.items() if name not in (HEAD, HEAD_SWAPPED)}
        likelihoods = {name: m for name, m in named.items() if VectorKey.parse(name).layer == LM_LAYER}
        return cls(matrices[HEAD], matrices.get(HEAD_SWAPPED, matrices[HEAD]),
                   {name: m for name, m in named.items() if name not in likelihoods}, likelihoods)

    def columns(self) -> dict[str, np.ndarray]:
        """The feature table's vector columns."""
        return {HEAD: self.head, HEAD_SWAPPED: self.head_swapped, **self.vectors, **self.likelihoods}

    def head_probabilities(self) -> np.ndarray:
        """The head's prediction: both orientations averaged (swap TTA), or the single pass."""
        return (self.head + self.head_swapped) / 2

    def take(self, order: np.ndarray) -> "PassFeatures":
        return PassFeatures.from_columns({name: m[order] for name, m in self.columns().items()})

    @property
    def width(self) -> int | None:
        """The vectors' width (None when the passes pooled none)."""
        return next((m.shape[1] for m in self.vectors.values()), None)

    @staticmethod
    def mean(passes: Sequence["PassFeatures"]) -> "PassFeatures":
        """Column by column mean of several passes over the same rows (the fold adapters' test passes)."""
        columns = [p.columns() for p in passes]
        return PassFeatures.from_columns({name: np.mean([c[name] for c in columns], axis=0) for name in columns[0]})


def produced_inputs(embed: Any) -> set[str]:
    """What a feature table made with these embed settings holds, in the terms stage-two groups declare they read
    (`pipeline/stage_two/groups.py`): text and head always, the pooled vectors, the LM's span likelihoods with
    embed.lm_features, and the base model's (`base_vectors`, `base_likelihoods`) with embed.base_vectors."""
    made = {"text", "head", "vectors"} | ({"likelihoods"} if embed.lm_features else set())
    return made | ({f"base_{name}" for name in made & {"vectors", "likelihoods"}} if embed.base_vectors else set())


def write_feature_table(path: str | Path, columns: dict[str, Any], matrices: dict[str, Any], dtype: str) -> None:
    """Parquet with scalar columns plus fixed-width vector columns (one list per row) stored as `dtype`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: pa.array(np.asarray(values)) for name, values in columns.items()}
    for name, matrix in matrices.items():
        matrix = np.ascontiguousarray(matrix, dtype=dtype)
        arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    with artifacts.atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)


@dataclass
class FeatureTable:
    scalars: pd.DataFrame            # id, fold, ... (one value per row)
    matrices: dict[str, Any]         # name -> (rows, width) float32

    @property
    def features(self) -> PassFeatures:
        return PassFeatures.from_columns(self.matrices)


def read_feature_table(path: str | Path) -> FeatureTable:
    """Inverse of `write_feature_table`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise UserError(f"{path} is damaged ({type(exc).__name__}); delete it and re-run the stage that made it "
                        "(stage=embed for features)") from None
    scalars, matrices = {}, {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            matrices[name] = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
        else:
            scalars[name] = column.to_numpy(zero_copy_only=False)
    return FeatureTable(pd.DataFrame(scalars), matrices)


def write_features(path: Path, ids: np.ndarray, fold: np.ndarray, feats: PassFeatures,
                   storage_dtype: str) -> None:
    write_feature_table(path, {"id": np.asarray(ids).astype(str), "fold": np.asarray(fold)}, feats.columns(),
                        dtype=storage_dtype)

def is_current(fold_dir: Path, setup: dict) -> bool:
    """True when the fold's features are finished and were made with exactly `setup`."""
    state = artifacts.read_state(fold_dir)
    return bool(state and state.get(layout.DONE) and all(state.get(k) == v for k, v in setup.items()))


def test_folder(ctx: RunContext, finetune_state: dict) -> Path:
    """The folder of the test file's features for this embed setup (and embed.test_adapters)."""
    setup = setups.test_setup(ctx.cfg, finetune_state)
    names = artifacts.file_fingerprint(ctx.test_path), artifacts.config_hash(setup)
    in_experiment = ctx.layout.test_folder(*names)
    # The experiment's own test features when it has them (a stack multirun job reads them); a run writing
    # elsewhere (stage=predict with paths.predict_dir) keeps new ones in its own folder.
    if ctx.out.root == ctx.layout.root or in_experiment.exists():
        return in_experiment
    return ctx.out.test_folder(*names)

def leaking_rows(ids: np.ndarray, feature_fold: np.ndarray, assigned_fold: dict[str, int], manifest: dict) -> list[str]:
    """Ids whose features came from an adapter trained on them, or whose fold disagrees with folds.parquet."""
    trained_on = {entry["scored_fold"]: set(entry["adapter_train_folds"]) for entry in manifest["train"].values()}
    bad = []
    for row_id, fold in zip(ids, feature_fold):
        fold = int(fold)
        if assigned_fold.get(str(row_id)) != fold or fold not in trained_on or fold in trained_on[fold]:
            bad.append(str(row_id))
    return bad


def read_in_order(path: Path, ids: np.ndarray) -> PassFeatures:
    """A feature table's features with rows in the order of `ids` (every id must be there)."""
    if not path.exists():
        raise UserError(f"{path} not found; run stage=embed first")
    return rows_in_order(read_feature_table(path), ids, path)


def rows_in_order(table: FeatureTable, ids: np.ndarray, path: Path) -> PassFeatures:
    """`table`'s features with rows in the order of `ids`; `path` names the file when an id is missing."""
    index = pd.Series(np.arange(len(table.scalars)), index=table.scalars["id"].astype(str))
    missing = [i for i in ids if i not in index.index]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} rows (first id {missing[0]}); re-run stage=embed")
    return table.features.take(index.loc[list(ids)].to_numpy())


def finetune_fold_states(ctx: RunContext) -> list[dict]:
    """Every fold's finetune state; refuses when a fold is not finished, or was trained on another train file,
    other base weights, or with other model / formatting / fine-tune settings than this command line's. Every fold
    is checked: folds trained as separate jobs (`finetune.folds=[k]`) may each have been run differently."""
    lay, cfg = ctx.layout, ctx.cfg
    states = [artifacts.read_state(lay.finetune_fold(k)) for k in range(ctx.n_folds)]
    missing = [k for k, s in enumerate(states) if not (s and s.get(layout.DONE))]
    if missing:
        raise UserError(f"finetune folds {missing} of {lay.root} are not finished; run stage=finetune first")
    for k, state in enumerate(states):
        expected = setups.finished_fold_setup(cfg, state)
        settings = setups.finetune_settings(setups.as_trained(cfg, state))
        if state.get("data") != expected["data"]:
            raise UserError(f"data.train differs from the file fold {k}'s adapter of {lay.root} was trained on "
                            f"(content {state.get('data')} vs {expected['data']}); use that file, or a new exp_name")
        if artifacts.changed_setup(state, expected):
            raise UserError(f"fold {k}'s adapter of {lay.root} was trained with other settings than this command "
                            f"line's ({artifacts.describe_changes(state, expected, settings)}); drop those overrides, "
                            f"or delete {lay.finetune_fold(k)} and run stage=finetune to retrain it")
    return states

def oof_features(ctx: RunContext, finetune_state: dict) -> PassFeatures:
    """OOF embed features in data order, after the checks that they are leak-free and made with this setup (that
    of the adapters whose checked state is `finetune_state`: finetune_fold_states)."""
    lay = ctx.layout
    path, manifest_path = lay.train_features, lay.embed_manifest
    if not path.exists() or not manifest_path.exists():
        raise UserError(f"{path} not found; run stage=embed first")
    manifest = artifacts.read_json(manifest_path)
    expected = setups.embed_setup(ctx.cfg, finetune_state)
    changed = [k for k, v in expected.items() if manifest.get("setup", {}).get(k) != v]
    if changed:
        raise UserError(f"{path} was made with other settings ({', '.join(changed)} differ from this command "
                        "line's); run stage=embed with these settings first")
    table = read_feature_table(path)  # read once: it can be the experiment's largest file
    features = rows_in_order(table, ctx.ids, path)
    scalars = table.scalars
    assigned = dict(zip(ctx.ids, ctx.fold_of.astype(int)))
    leaks = leaking_rows(scalars["id"].astype(str).to_numpy(), scalars["fold"].to_numpy(), assigned,
                                    manifest)
    if leaks:
        raise UserError(f"{path}: {len(leaks)} rows (first id {leaks[0]}) were scored by an adapter trained on them "
                        "or on another fold layout; delete the embed folder and re-run stage=embed")
    return features


def test_features(ctx: RunContext, finetune_state: dict) -> PassFeatures:
    """The test file's features, made by finetune/embed/predict with the current setup (never extracted here)."""
    folder = test_folder(ctx, finetune_state)
    path = folder / layout.TEST_FEATURES
    if not path.exists():
        raise UserError(f"no features for data.test={ctx.test_path} with this setup; run stage=embed (or "
                        "stage=predict) with it first")
    return read_in_order(path, ctx.test.frame["id"].to_numpy())

@dataclass
class OOFFeatures:
    """An experiment's out-of-fold features as plain arrays, rows in train-file order."""

    ids: np.ndarray                  # (n,) str
    folds: np.ndarray                # (n,) the experiment's fold of each row
    labels: np.ndarray               # (n,) 0 = a wins, 1 = b wins, 2 = tie
    head: np.ndarray                 # (n, 3) head probabilities, swap TTA averaged
    vectors: dict[str, np.ndarray]   # every other column ("{layer}_{span}_{orientation}", ...), see the docstring

    def frame(self) -> pd.DataFrame:
        """One DataFrame: id, fold, label, head_a/head_b/head_tie and one column per vector dimension."""
        columns = {"id": self.ids, "fold": self.folds, "label": self.labels,
                   **{f"head_{c}": self.head[:, j] for j, c in enumerate(("a", "b", "tie"))}}
        for name, matrix in self.vectors.items():
            columns.update({f"{name}_{j}": matrix[:, j] for j in range(matrix.shape[1])})
        return pd.DataFrame(columns)


def load_oof_features(exp: str | Path) -> OOFFeatures:
    """The vectors for your own model: every row's OOF features (from the adapter that never trained on it) with
    the experiment's folds and labels, so any classifier can be fitted on exactly our folds.

        from pipeline.feature_table import load_oof_features
        oof = load_oof_features("outputs/shared_ties")
        for k in np.unique(oof.folds): train, valid = oof.folds != k, oof.folds == k ...
    """
    path = Layout(Path(exp)).train_features
    if not path.exists():
        raise UserError(f"{path} not found; run stage=embed (or stage=all) for this experiment first")
    table = read_feature_table(path)
    scalars, features = table.scalars, table.features
    return OOFFeatures(scalars["id"].astype(str).to_numpy(), scalars["fold"].to_numpy(),
                       scalars["label"].to_numpy(), features.head_probabilities(),
                       {**features.vectors, **features.likelihoods})
