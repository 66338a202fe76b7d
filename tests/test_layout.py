"""The experiment layout (one object owns every path and state key), the fold records, the run context, and the
row sharding that spreads a pass over ranks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import artifacts, context, dist, feature_table, layout
from pipeline.layout import EmbedFoldRecord, FinetuneFoldRecord, Layout


def test_every_path_is_distinct_and_inside_the_experiment(tmp_path):
    lay = Layout(tmp_path / "exp")
    paths = [lay.folds, lay.metrics, lay.manifest("embed"), lay.submission, lay.finetune_oof, lay.averaged_adapter,
             lay.train_features, lay.embed_manifest, lay.tracking("stack"), lay.stack / layout.MODEL_FILE,
             lay.test_folder("abcd", "0123456789"), lay.shard_folder("fold_0")]
    for k in range(3):
        paths += [lay.finetune_fold(k), lay.adapter(k), lay.checkpoints(k), lay.fold_oof(k), lay.embed_fold(k),
                  lay.fold_features(k)]
    assert len(set(paths)) == len(paths)
    assert all(p.is_relative_to(lay.root) for p in paths)
    assert lay.adapter(2) == tmp_path / "exp" / "finetune" / "fold_2" / "adapter"
    assert lay.fold_features(1) == tmp_path / "exp" / "embed" / "fold_1" / "train.parquet"
    assert lay.test_folder("abcd", "0123456789").name == "test_abcd_01234567"
    assert layout.test_fold_features(Path("t"), 2) == Path("t/fold_2.parquet")
    assert layout.test_fold_features(Path("t"), None) == Path("t/averaged.parquet")


def test_fold_records_and_done_markers(tmp_path):
    setup = {"seed": 1, "config_hash": "abc"}
    folder = tmp_path / "fold_0"
    artifacts.mark_started(folder, setup)
    assert not feature_table.is_current(folder, setup)
    record = EmbedFoldRecord(0, "a/adapter", [1, 2], 30, 1.5, [{"rank": 0, "rows": 30, "tokens": 900}])
    artifacts.mark_done(folder, record.as_state(setup))
    state = artifacts.read_state(folder)
    assert state[layout.DONE] and state["scored_fold"] == 0 and state["adapter_train_folds"] == [1, 2]
    assert state["ranks"][0]["rows"] == 30
    assert feature_table.is_current(folder, setup) and not feature_table.is_current(folder, {**setup, "seed": 2})
    ft = FinetuneFoldRecord(2, [0, 1], {"logloss": 1.0}, {"finetune": {"epochs": 1}}).as_state(setup)
    assert ft == {"seed": 1, "config_hash": "abc", "fold": 2, "train_folds": [0, 1], "stats": {"logloss": 1.0},
                  "settings": {"finetune": {"epochs": 1}}}


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_row_once_and_balance_tokens(world):
    rng = np.random.default_rng(world)
    lengths = rng.integers(20, 600, 101).tolist()
    shares = dist.shard_rows(lengths, world)
    joined = np.concatenate(shares)
    assert sorted(joined.tolist()) == list(range(101))
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(lengths)  # greedy longest-first: within one row of even
    assert [s.tolist() for s in dist.shard_rows(lengths, world)] == [s.tolist() for s in shares]


def test_more_ranks_than_rows_leaves_empty_shares():
    shares = dist.shard_rows([5, 9], 4)
    assert sorted(len(s) for s in shares) == [0, 0, 1, 1]


def test_run_context_reads_inputs_once_and_records_the_stage(tiny_cfg):
    cfg = tiny_cfg()
    ctx = context.open_run(cfg, "check")
    assert ctx.layout.root == Path(cfg.paths.exp_dir)
    assert len(ctx.ids) == len(ctx.fold_of) == len(ctx.labels) == 90
    assert set(ctx.fold_of.tolist()) == {0, 1, 2} and ctx.test is not None and ctx.test_path.exists()
    assert ctx.layout.folds.exists() and ctx.layout.manifest("check").exists()
    assert ctx.world_size == 1 and ctx.is_main and ctx.device.type == "cpu"


def test_input_files_are_parsed_once_per_process_until_they_change(tmp_path):
    import pandas as pd

    path = tmp_path / "train.csv"
    pd.DataFrame({"id": ["1", "2"], "prompt": ['["p"]'] * 2, "response_a": ['["a"]'] * 2,
                  "response_b": ['["b"]'] * 2, "winner_model_a": [1, 0], "winner_model_b": [0, 1],
                  "winner_tie": [0, 0]}).to_csv(path, index=False)
    first = context.read_pairs(path, with_labels=True)
    assert context.read_pairs(path, with_labels=True) is first
    pd.read_csv(path).head(1).to_csv(path, index=False)
    changed = context.read_pairs(path, with_labels=True)
    assert changed is not first and len(changed.frame) == 1


def test_a_setup_change_is_told_key_by_key():
    """describe_changes names each changed setup key, and a changed settings hash as the dotted settings that
    differ (recorded -> current), not as two opaque hashes; a key added later and absent from an old state is no
    change."""
    state = {"seed": 0, "data": "aa", "config_hash": "h1",
             "settings": {"finetune": {"learning_rate": 5e-4, "lora": {"r": 16}}, "model": {"max_length": 128}}}
    expected = {"seed": 1, "data": "aa", "config_hash": "h2", "base_model": "fp"}
    settings = {"finetune": {"learning_rate": 1e-3, "lora": {"r": 8}}, "model": {"max_length": 128}}
    assert artifacts.describe_changes(state, expected, settings) == \
        "seed: 0 -> 1, finetune.learning_rate: 0.0005 -> 0.001, finetune.lora.r: 16 -> 8"
    assert artifacts.describe_changes(state, expected, None) == "seed: 0 -> 1, config_hash: 'h1' -> 'h2'"
    assert artifacts.changed_setup(state, {"seed": 0, "data": "aa", "config_hash": "h1", "base_model": "x"}) == []
