"""Embed stage: hook-pooled vectors match output_hidden_states, spans are exact, padding does not matter,
and the leak check fires."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import artifacts, embed_passes, feature_table, inputs, layout
from pipeline.llm import modeling
from pipeline.data import load_pairs
from pipeline.errors import UserError
from pipeline.formatting import encode_frame, segment_text
from pipeline.llm.inference import MIN_BATCH_SHARE, forward_pass, length_batches, padding_share, span_weights
from pipeline.stages import stack


@pytest.fixture(scope="module")
def fold_model(tiny_experiment):
    cfg, exp, _ = tiny_experiment
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    model = modeling.load_with_adapter(source, cfg.model, tokenizer, exp / "finetune" / "fold_0" / "adapter",
                                       torch.float32, torch.device("cpu"))
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame.iloc[:9]
    return model, tokenizer, encode_frame(tokenizer, frame, cfg.model), frame


def test_pooled_vectors_match_output_hidden_states(fold_model):
    """Every captured layer (tiny Llama: 2 decoder layers; 0.5 = layer 0's output, 1.0 = the final norm) and every
    span equals pooling output_hidden_states by hand, from the one pass that also gives the logits."""
    model, tokenizer, encoded, _ = fold_model
    out = forward_pass(model, encoded, tokenizer.pad_token_id, 10_000, torch.device("cpu"), torch.float32,
                       layers=[0.5, 1.0])
    assert set(out.vectors) == {(layer, span) for layer in ("h050", "h100") for span in ("prompt", "a", "b", "verdict")}
    for i, enc in enumerate(encoded):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True)
        for layer, hidden_index in (("h050", 1), ("h100", -1)):
            hidden = ref.hidden_states[hidden_index][0]
            for span, (start, end) in (("a", enc.span_a), ("b", enc.span_b), ("prompt", enc.span_prompt),
                                       ("verdict", (len(enc.input_ids) - 1, len(enc.input_ids)))):
                np.testing.assert_allclose(out.vectors[layer, span][i], hidden[start:end].mean(0).numpy(),
                                           atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.logits[i], ref.logits[0].numpy(), atol=1e-4, rtol=1e-4)


def test_padding_side_and_batch_composition_do_not_change_a_row(fold_model):
    model, tokenizer, encoded, _ = fold_model
    args = (tokenizer.pad_token_id, torch.device("cpu"), torch.float32)
    alone = [forward_pass(model, [e], args[0], 10_000, *args[1:], layers=[1.0]) for e in encoded]
    for side in ("right", "left"):
        batched = forward_pass(model, encoded, args[0], 10_000, *args[1:], layers=[1.0], padding_side=side)
        small = forward_pass(model, encoded, args[0], 300, *args[1:], layers=[1.0], padding_side=side)
        for i, single in enumerate(alone):
            for out in (batched, small):
                for key, matrix in single.vectors.items():
                    np.testing.assert_allclose(out.vectors[key][i], matrix[0], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(out.logits[i], single.logits[0], atol=1e-4, rtol=1e-4)


def test_scoring_batches_close_before_padding_dominates():
    """Every row once, longest first, within the token budget and max_rows; a batch that already holds
    batch_tokens / MIN_BATCH_SHARE real tokens closes before padding would pass max_padding of it, so short
    rows of mixed lengths (the demo data) stop padding half of each batch; without the rule (max_padding=None)
    batches fill the budget as before."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 150, 200).tolist()
    budget = 8192
    batches = length_batches(lengths, budget, max_padding=0.1)
    filled = length_batches(lengths, budget)
    for grouping in (batches, filled):
        assert sorted(i for b in grouping for i in b) == list(range(200))
        assert all(len(b) * lengths[b[0]] <= budget and lengths[b[0]] == max(lengths[i] for i in b) for b in grouping)
    enough = budget / MIN_BATCH_SHARE
    for b in batches[:-1]:
        closed_early = len(b) * lengths[b[0]] < budget - lengths[b[0]]
        if closed_early:  # it had enough real tokens, and one more row would have padded too much
            assert sum(lengths[i] for i in b) >= enough
    assert all(padding_share(lengths, [b]) <= 0.1 for b in batches[:-1]
               if sum(lengths[i] for i in b[:-1]) >= enough)
    assert padding_share(lengths, batches) < 0.12 and padding_share(lengths, filled) > 1.5 * padding_share(lengths, batches)
    assert all(len(b) <= 5 for b in length_batches(lengths, budget, max_rows=5, max_padding=0.1))
    tiny = length_batches([100, 10, 10], budget, max_padding=0.1)  # too few real tokens to close early: one batch
    assert tiny == [[0, 1, 2]]


@pytest.mark.parametrize("max_batch_padding", [0.1, None])
def test_scoring_passes_batch_rows_by_embed_max_batch_padding(fold_model, tiny_experiment, monkeypatch,
                                                               max_batch_padding):
    """The pipeline's passes hand embed.max_batch_padding to the batching (null, an older experiment's recorded
    value, batches as before), and a value outside [0, 1) is refused in one line."""
    from pipeline.llm import inference

    model, tokenizer, encoded, _ = fold_model
    cfg = tiny_experiment[0]
    seen = []
    real = inference.length_batches
    monkeypatch.setattr(inference, "length_batches", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    embed = OmegaConf.merge(cfg.embed, {"max_batch_padding": max_batch_padding, "swap_tta": False})
    settings = embed_passes.PassSettings(tokenizer.pad_token_id, embed, torch.device("cpu"), torch.float32)
    embed_passes.pass_features(model, embed_passes.Rows(encoded, None), settings)
    assert seen == [max_batch_padding]
    for bad in (1.0, -0.1, True, "x"):
        with pytest.raises(UserError, match="embed.max_batch_padding"):
            embed_passes.validate(OmegaConf.merge(cfg.embed, {"max_batch_padding": bad}))


def test_spans_cover_exactly_the_truncated_responses(tiny_cfg):
    cfg = tiny_cfg("model.max_length=150", "model.truncation_side=left")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame
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
    table = feature_table.read_feature_table(exp / "embed" / layout.TRAIN_FEATURES)
    scalars, matrices = table.scalars, table.matrices
    assert scalars["id"].is_unique and len(scalars) == metrics["check"]["train"]["n_rows"]
    expected = {f"h{round(f * 100):03d}_{span}_{o}" for f in cfg.embed.layers
                for span in ("prompt", "a", "b", "verdict") for o in ("fwd", "swp")}
    assert set(matrices) == {"head", "head_swapped", *expected}
    manifest = artifacts.read_json(exp / "embed" / layout.MANIFEST)
    assert set(manifest["train"]) == {f"fold_{k}" for k in range(cfg.cv.n_folds)}
    # The finetune OOF head probabilities are the embed pass's (one pass, not two).
    oof = pd.read_parquet(exp / "finetune" / "oof.parquet")
    np.testing.assert_allclose(oof[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(),
                               (matrices["head"] + matrices["head_swapped"]) / 2, atol=2e-3)


def test_fold_end_features_equal_a_separate_embed_pass(tiny_experiment, tmp_path):
    """What finetune wrote at the end of each fold equals what stage=embed computes on its own from the saved
    adapters (embed reloads the base once and swaps adapters)."""
    import shutil

    cfg, exp, _ = tiny_experiment
    copy = tmp_path / cfg.exp_name
    shutil.copytree(exp, copy)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    for k in range(cfg.cv.n_folds):
        shutil.rmtree(copy / "embed" / f"fold_{k}")
    (copy / "embed" / layout.TRAIN_FEATURES).unlink()
    again = cfg.copy()
    again.paths.output_dir = str(tmp_path)
    again.paths.exp_dir = str(copy)
    from pipeline.stages import embed

    assert embed.run(again)["refreshed_folds"] == list(range(cfg.cv.n_folds))
    original = feature_table.read_feature_table(exp / "embed" / layout.TRAIN_FEATURES).matrices
    separate = feature_table.read_feature_table(copy / "embed" / layout.TRAIN_FEATURES).matrices
    assert set(original) == set(separate)
    for name in original:
        np.testing.assert_allclose(separate[name], original[name], atol=2e-3, rtol=1e-2)


def test_leak_check_fires_on_doctored_manifest(tiny_experiment, tmp_path):
    cfg, exp, _ = tiny_experiment
    manifest = artifacts.read_json(exp / "embed" / layout.MANIFEST)
    scalars = feature_table.read_feature_table(exp / "embed" / layout.TRAIN_FEATURES).scalars
    folds = pd.read_parquet(exp / "folds.parquet")
    assigned = dict(zip(folds["id"].astype(str), folds["fold"]))
    assert feature_table.leaking_rows(scalars["id"], scalars["fold"], assigned, manifest) == []
    doctored = copy.deepcopy(manifest)
    doctored["train"]["fold_1"]["adapter_train_folds"].append(1)
    leaks = feature_table.leaking_rows(scalars["id"], scalars["fold"], assigned, doctored)
    assert set(leaks) == set(folds.loc[folds["fold"] == 1, "id"].astype(str))
    # The stack stage refuses such features (on a copy: the shared experiment stays as every test expects it).
    import shutil

    shutil.copytree(exp, tmp_path / cfg.exp_name)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")
    artifacts.write_json(tmp_path / cfg.exp_name / "embed" / layout.MANIFEST, doctored)
    doctored_cfg = cfg.copy()
    doctored_cfg.paths.output_dir = str(tmp_path)
    doctored_cfg.paths.exp_dir = str(tmp_path / cfg.exp_name)
    with pytest.raises(UserError, match="scored by an adapter trained on them"):
        stack.run(doctored_cfg)


def test_load_oof_features_for_your_own_model(tiny_experiment):
    """One call gives ids, folds, labels, head and vectors as arrays aligned with folds.parquet; README's import path
    (pipeline.extraction) and the feature table's are one function."""
    from pipeline import feature_table
    from pipeline.extraction import load_oof_features

    assert load_oof_features is feature_table.load_oof_features

    cfg, exp, _ = tiny_experiment
    oof = load_oof_features(exp)
    folds = pd.read_parquet(exp / "folds.parquet")
    assert list(oof.ids) == list(folds["id"].astype(str)) and (oof.folds == folds["fold"].to_numpy()).all()
    labels = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame["label"].to_numpy()
    assert (oof.labels == labels).all()
    np.testing.assert_allclose(oof.head.sum(axis=1), 1, atol=1e-2)
    frame = oof.frame()
    assert len(frame) == len(labels) and "h100_a_fwd_0" in frame.columns


@pytest.mark.parametrize("override", ["finetune.learning_rate=0.123", "model.max_length=100", "seed=7"])
def test_embed_and_stack_refuse_a_finetune_setting_other_than_the_adapters(tiny_experiment, override):
    """stage=embed / stage=stack after a finished fine-tune must not record settings that did not make it."""
    from conftest import TINY_OVERRIDES, compose_cfg
    from pipeline.stages import embed

    cfg, _, _ = tiny_experiment
    changed = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={cfg.paths.output_dir}",
                           f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}", override])
    for stage in (embed, stack):
        with pytest.raises(UserError, match="other settings|differs"):
            stage.run(changed)


def test_embed_refuses_a_train_file_with_other_contents(tiny_experiment, tmp_path):
    """Same ids, response_a and response_b swapped: another file, refused before any pass."""
    from conftest import TINY_OVERRIDES, compose_cfg
    from pipeline.stages import embed

    cfg, exp, _ = tiny_experiment
    original = pd.read_csv(inputs.data_paths(cfg).train)
    swapped = original.rename(columns={"response_a": "response_b", "response_b": "response_a",
                                       "winner_model_a": "winner_model_b", "winner_model_b": "winner_model_a"})
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    changed = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={cfg.paths.output_dir}",
                           f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}",
                           f"data.train={tmp_path / 'swapped.csv'}", f"data.test={inputs.data_paths(cfg).test}"])
    with pytest.raises(UserError, match="data.train differs"):
        embed.run(changed)


def test_lm_likelihoods_match_the_causal_lm_by_hand(fold_model, tiny_experiment):
    """The likelihood features from the classifier's own pass equal what the LM head gives on output_hidden_states:
    each span token's log-probability predicted from the position before it, and those predictions' entropy,
    averaged over the span; padding and batch composition do not change them."""
    from pipeline.llm.inference import LMHead

    model, tokenizer, encoded, _ = fold_model
    cfg = tiny_experiment[0]
    # The tiny Llama is untied: its LM head is read from the checkpoint, which the classifier does not load.
    weight = modeling.output_embeddings(model, modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir))
    assert weight is not None and not model.config.tie_word_embeddings
    head = LMHead(weight.float())
    on = torch.device("cpu")
    outs = [forward_pass(model, encoded, tokenizer.pad_token_id, budget, on, torch.float32, lm_head=head,
                         padding_side=side) for budget, side in ((10_000, "right"), (300, "left"))]
    assert set(outs[0].vectors) == {("lm", span) for span in ("prompt", "a", "b")}
    for i, enc in enumerate(encoded):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states[-1][0]
        logp = torch.log_softmax(hidden @ head.weight.T, dim=-1)
        for span, (start, end) in (("a", enc.span_a), ("b", enc.span_b), ("prompt", enc.span_prompt)):
            targets = torch.tensor(enc.input_ids[start:end])
            rows = logp[start - 1: end - 1]
            expected = [rows.gather(1, targets[:, None]).mean().item(), -(rows.exp() * rows).sum(-1).mean().item()]
            for out in outs:
                np.testing.assert_allclose(out.vectors["lm", span][i], expected, atol=1e-4, rtol=1e-4)


def test_head_tail_truncation_keeps_both_ends_and_a_long_scoring_pass_keeps_whole_responses(tiny_cfg):
    """head_tail keeps a truncated response's first and last tokens (the span holds exactly those); the scoring
    passes at embed.max_length (embed_passes.encode_rows) see responses the training length cuts, with exact spans."""
    cfg = tiny_cfg("model.max_length=150", "model.truncation_side=head_tail", "embed.max_length=2000",
                   "embed.swap_tta=true")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame
    cut = 0
    for enc, a, b in zip(encode_frame(tokenizer, frame, cfg.model), frame["response_a"], frame["response_b"]):
        for span, turns in ((enc.span_a, a), (enc.span_b, b)):
            kept = enc.input_ids[slice(*span)]
            full = tokenizer(segment_text(turns), add_special_tokens=False)["input_ids"]
            head = (len(kept) + 1) // 2
            assert kept == full[:head] + full[len(full) - (len(kept) - head):]
            cut += len(kept) < len(full)
    assert cut > 0
    rows = embed_passes.encode_rows(tokenizer, frame, cfg)
    for enc, swapped, a, b in zip(rows.encoded, rows.swapped, frame["response_a"], frame["response_b"]):
        assert tokenizer.decode(enc.input_ids[slice(*enc.span_a)]) == segment_text(a)
        assert tokenizer.decode(enc.input_ids[slice(*enc.span_b)]) == segment_text(b)
        assert tokenizer.decode(swapped.input_ids[slice(*swapped.span_a)]) == segment_text(b)
    assert max(len(e.input_ids) for e in rows.encoded) > 150


def test_long_scoring_pass_with_lm_features_reuses_the_adapters_and_feeds_the_likelihood_member(tiny_experiment,
                                                                                                tmp_path):
    """embed.max_length / embed.lm_features on a finished experiment: the adapters are reused (no retraining), the
    features are made again at the new length with `lm_*` columns of both models, and stage two reads them; the
    defaults of the new settings leave finished work current (nothing refreshed)."""
    import shutil

    from pipeline.stages import embed

    cfg, exp, _ = tiny_experiment
    copy = tmp_path / cfg.exp_name
    shutil.copytree(exp, copy)
    shutil.copytree(exp.parent / "demo_data", tmp_path / "demo_data")

    def at(**settings):
        again = cfg.copy()
        again.paths.output_dir, again.paths.exp_dir = str(tmp_path), str(copy)
        for key, value in settings.items():
            OmegaConf.update(again, key.replace("__", "."), value)
        return again

    assert embed.run(at())["refreshed_folds"] == []
    long_ = {"embed__max_length": 512, "embed__lm_features": True, "embed__base_vectors": True}
    long = at(**long_)
    assert embed.run(long)["refreshed_folds"] == list(range(cfg.cv.n_folds))
    columns = feature_table.read_feature_table(copy / "embed" / layout.TRAIN_FEATURES).matrices
    assert {f"{p}lm_{s}_{o}" for p in ("", "base_") for s in ("prompt", "a", "b") for o in ("fwd", "swp")} <= set(columns)
    assert columns["lm_a_fwd"].shape[1] == 2 and np.isfinite(columns["lm_a_fwd"]).all()
    stacked = stack.run(at(**long_, stack__blend_members=["head", "text", "likelihood"]))
    assert np.isfinite(stacked["oof_logloss"]) and np.isfinite(stacked["members"]["likelihood"])
    assert "likelihood" in stacked["features"]["groups"]["likelihood"]
    # What the member reads: each response's mean log-likelihood and entropy of the new pass (both orientations
    # averaged), their A-B differences and the prompt's, row for row from the feature table.
    from pipeline.stage_two.design import design, stacker_inputs

    table = feature_table.read_feature_table(copy / "embed" / layout.TRAIN_FEATURES)
    frame = load_pairs(inputs.data_paths(long).train, with_labels=True).frame
    feats = table.features.take(table.scalars.set_index("id").index.get_indexer(frame["id"]))
    built = design(stacker_inputs(frame, feats), ["likelihood"], stacked["features"]["vectors"], {})
    a = (columns["lm_a_fwd"] + columns["lm_a_swp"]) / 2
    b = (columns["lm_b_fwd"] + columns["lm_b_swp"]) / 2
    order = table.scalars.set_index("id").index.get_indexer(frame["id"])
    assert built.columns[:3] == ["lm_loglik_a", "lm_loglik_b", "lm_loglik_a_minus_b"]
    np.testing.assert_allclose(built.original[:, 0], a[order, 0], rtol=1e-6)
    np.testing.assert_allclose(built.original[:, 2], (a - b)[order, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(built.mirrored[:, 2], -built.original[:, 2])
