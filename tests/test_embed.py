"""Embed stage: hook-pooled vectors match output_hidden_states, spans are exact, padding does not matter,
and the leak check fires."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline import artifacts, inputs, modeling
from pipeline.errors import UserError
from pipeline.formatting import encode_frame, segment_text
from pipeline.inference import forward_pass, span_weights
from pipeline.stages import embed, stack


@pytest.fixture(scope="module")
def fold_model(tiny_experiment):
    cfg, exp, _ = tiny_experiment
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    model = modeling.load_with_adapter(source, cfg.model, tokenizer, exp / "finetune" / "fold_0" / "adapter",
                                       torch.float32, torch.device("cpu"))
    frame = inputs.load_train(cfg).frame.iloc[:9]
    return model, tokenizer, encode_frame(tokenizer, frame, cfg.model), frame


@pytest.mark.parametrize("layer, hidden_index", [(-1, -1), (0, 1)])
def test_pooled_vectors_match_output_hidden_states(fold_model, layer, hidden_index):
    model, tokenizer, encoded, _ = fold_model
    out = forward_pass(model, encoded, tokenizer.pad_token_id, 10_000, torch.device("cpu"), torch.float32,
                       pool_layer=layer)
    for i, enc in enumerate(encoded):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True)
        hidden = ref.hidden_states[hidden_index][0]
        np.testing.assert_allclose(out.vec_a[i], hidden[slice(*enc.span_a)].mean(0).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.vec_b[i], hidden[slice(*enc.span_b)].mean(0).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.logits[i], ref.logits[0].numpy(), atol=1e-4, rtol=1e-4)


def test_padding_side_and_batch_composition_do_not_change_a_row(fold_model):
    model, tokenizer, encoded, _ = fold_model
    args = (tokenizer.pad_token_id, torch.device("cpu"), torch.float32)
    alone = [forward_pass(model, [e], args[0], 10_000, *args[1:], pool_layer=-1) for e in encoded]
    for side in ("right", "left"):
        batched = forward_pass(model, encoded, args[0], 10_000, *args[1:], pool_layer=-1, padding_side=side)
        small = forward_pass(model, encoded, args[0], 300, *args[1:], pool_layer=-1, padding_side=side)
        for i, single in enumerate(alone):
            for out in (batched, small):
                np.testing.assert_allclose(out.vec_a[i], single.vec_a[0], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(out.vec_b[i], single.vec_b[0], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(out.logits[i], single.logits[0], atol=1e-4, rtol=1e-4)


def test_spans_cover_exactly_the_truncated_responses(tiny_cfg):
    cfg = tiny_cfg("model.max_length=150", "model.truncation_side=left")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = inputs.load_train(cfg).frame
    truncated = 0
    for enc, a, b in zip(encode_frame(tokenizer, frame, cfg.model), frame["response_a"], frame["response_b"]):
        assert len(enc.input_ids) <= 150
        for span, turns in ((enc.span_a, a), (enc.span_b, b)):
            kept = tokenizer.decode(enc.input_ids[slice(*span)])
            full = segment_text(turns)
            assert full.endswith(kept) and len(kept) > 0  # left truncation keeps the end, nothing else
            truncated += kept != full
    assert truncated > 0
    weights = span_weights([(2, 5), (0, 0)], 7, "mean")
    assert weights[0].tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0]) and weights[1].sum() == 0
    assert span_weights([(2, 5)], 7, "last")[0].tolist() == [0, 0, 0, 0, 1, 0, 0]


def test_features_and_manifest(tiny_experiment):
    cfg, exp, metrics = tiny_experiment
    scalars, matrices = artifacts.read_feature_table(exp / "embed" / embed.TRAIN_FEATURES)
    assert scalars["id"].is_unique and len(scalars) == metrics["check"]["train"]["n_rows"]
    assert {"head", "head_swapped", "vec_a", "vec_b", "vec_diff"} <= set(matrices)
    np.testing.assert_allclose(matrices["vec_diff"], matrices["vec_a"] - matrices["vec_b"], atol=2e-2)
    manifest = artifacts.read_json(exp / "embed" / embed.MANIFEST)
    assert set(manifest["train"]) == {f"fold_{k}" for k in range(cfg.cv.n_folds)}


def test_leak_check_fires_on_doctored_manifest(tiny_experiment, tmp_path):
    cfg, exp, _ = tiny_experiment
    manifest = artifacts.read_json(exp / "embed" / embed.MANIFEST)
    scalars, _ = artifacts.read_feature_table(exp / "embed" / embed.TRAIN_FEATURES)
    import pandas as pd

    folds = pd.read_parquet(exp / "folds.parquet")
    assigned = dict(zip(folds["id"].astype(str), folds["fold"]))
    assert embed.leaking_rows(scalars["id"], scalars["fold"], assigned, manifest) == []
    doctored = copy.deepcopy(manifest)
    doctored["train"]["fold_1"]["adapter_train_folds"].append(1)
    leaks = embed.leaking_rows(scalars["id"], scalars["fold"], assigned, doctored)
    assert set(leaks) == set(folds.loc[folds["fold"] == 1, "id"].astype(str))
    # The stack stage refuses such features.
    original = (exp / "embed" / embed.MANIFEST).read_text()
    try:
        artifacts.write_json(exp / "embed" / embed.MANIFEST, doctored)
        with pytest.raises(UserError, match="scored by an adapter trained on them"):
            stack.run(cfg)
    finally:
        (exp / "embed" / embed.MANIFEST).write_text(original)
