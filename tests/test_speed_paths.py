"""The fast paths change no result beyond bf16 rounding: a scoring pass with the fold's LoRA merged into the base
weights (embed.merge_lora) and LoRA linears without PEFT's input casts (undone by autocast at once)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import embed_passes, inputs
from pipeline.llm import modeling
from pipeline.llm import adapters
from pipeline.llm.adapters import merged_lora
from pipeline.data import load_pairs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scoring(tiny_experiment):
    """Fold 0's trained adapter on the tiny base, in bf16 and in fp32, with 24 training rows encoded."""
    cfg, exp, _ = tiny_experiment
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    adapter = exp / "finetune" / "fold_0" / "adapter"
    models = {dtype: modeling.load_with_adapter(source, cfg.model, tokenizer, adapter, dtype, CPU)
              for dtype in (torch.bfloat16, torch.float32)}
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame.iloc[:24]
    rows = embed_passes.encode_rows(tokenizer, frame, cfg)
    return cfg, tokenizer, models, rows


def features(cfg, tokenizer, model, rows, dtype, merge: bool) -> dict[str, np.ndarray]:
    embed = OmegaConf.merge(cfg.embed, {"merge_lora": merge})
    settings = embed_passes.PassSettings(tokenizer.pad_token_id, embed, CPU, dtype)
    return embed_passes.pass_features(model, rows, settings).columns()


def largest_difference(one: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(one[k] - other[k]).max()) for k in one)


def test_a_merged_scoring_pass_agrees_with_the_unmerged_one_within_bf16_rounding(scoring):
    """Every feature of the merged bf16 pass lies as close to the unmerged bf16 pass as bf16 itself lies to fp32
    (twice that at most), while the adapter still matters: the merged pass is far from the base model's own."""
    cfg, tokenizer, models, rows = scoring
    bf16 = models[torch.bfloat16]
    unmerged = features(cfg, tokenizer, bf16, rows, torch.bfloat16, merge=False)
    merged = features(cfg, tokenizer, bf16, rows, torch.bfloat16, merge=True)
    reference = features(cfg, tokenizer, models[torch.float32], rows, torch.float32, merge=False)
    with bf16.disable_adapter():
        base = features(cfg, tokenizer, bf16, rows, torch.bfloat16, merge=False)
    rounding = largest_difference(unmerged, reference)
    assert set(merged) == set(unmerged)
    assert largest_difference(merged, unmerged) <= 2 * rounding
    assert largest_difference(merged, base) > 4 * largest_difference(merged, unmerged)


@pytest.mark.parametrize("copies_on_device", [True, False], ids=["merged-copy-on-device", "originals-in-host-memory"])
def test_merging_restores_every_base_weight_bit_for_bit(scoring, monkeypatch, copies_on_device):
    """After a merged pass (and after an error inside one) every weight of the model is what it was: the next fold's
    adapter, the base-model vectors and the unmerged pass see the same base. Both ways of keeping the originals
    (a merged copy beside them on the device; parked in host memory when no copy fits there) give the same
    features, bit for bit."""
    cfg, tokenizer, models, rows = scoring
    model = models[torch.bfloat16]
    on_device = features(cfg, tokenizer, model, rows, torch.bfloat16, merge=True)
    monkeypatch.setattr(adapters, "_copies_fit_on_device", lambda layers: copies_on_device)
    assert all(np.array_equal(on_device[k], v)
               for k, v in features(cfg, tokenizer, model, rows, torch.bfloat16, merge=True).items())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    with merged_lora(model) as merged:
        assert merged == n_lora > 0
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all("base_layer" in n for n in changed)
    with pytest.raises(RuntimeError, match="inside"):
        with merged_lora(model):
            raise RuntimeError("inside")
    features(cfg, tokenizer, model, rows, torch.bfloat16, merge=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with merged_lora(model, enabled=False) as merged:
        assert merged == 0


def test_lora_without_input_casts_gives_the_same_logits_and_gradients(tiny_cfg):
    """Under bf16 autocast, a LoRA model whose layers skip PEFT's input cast (fp32 and straight back) computes the
    same logits and the same gradients, bit for bit."""
    cfg = tiny_cfg()
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    ids = torch.randint(3, 200, (4, 40))
    results = []
    for skip in (True, False):
        torch.manual_seed(0)
        model = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, torch.bfloat16, CPU),
                                  cfg.model, cfg.finetune.lora, False)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide the LoRA path
                torch.nn.init.normal_(param, std=0.02)
        flags = [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert flags and not any(flags)  # add_lora turned the casts off
        modeling.set_lora_input_casts(model, not skip)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        logits.float().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast_logits, fast_grads), (cast_logits, cast_grads) = results
    assert torch.equal(fast_logits, cast_logits)
    assert fast_grads.keys() == cast_grads.keys() and fast_grads
    assert all(torch.equal(fast_grads[n], cast_grads[n]) for n in fast_grads)


def test_gguf_parsed_once_shares_one_reader_per_file_and_restores_gguf(tmp_path):
    """While converting, a GGUF file is parsed once however often transformers opens it, and gguf's tensor-name
    map is built once per (arch, depth); afterwards (also after an error) gguf's own functions are back."""
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with modeling.gguf_parsed_once():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is second and int(first.fields["llama.block_count"].parts[-1][0]) == 2
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA,
                                                                                                    2)
    assert gguf.GGUFReader is original_reader and gguf.get_tensor_name_map is original_map
    with pytest.raises(RuntimeError), modeling.gguf_parsed_once():
        raise RuntimeError("a failed conversion")
    assert gguf.GGUFReader is original_reader and gguf.get_tensor_name_map is original_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


@pytest.mark.parametrize(("requested", "max_length", "device", "expected"), [
    ("auto", 128, "cpu", "eager"), ("auto", modeling.EAGER_TRAINING_MAX_TOKENS, "cpu", "eager"),
    ("auto", modeling.EAGER_TRAINING_MAX_TOKENS + 1, "cpu", None), ("auto", 128, "cuda", None),
    (None, 128, "cpu", None), ("sdpa", 128, "cpu", "sdpa"), ("eager", 4096, "cuda", "eager")])
def test_training_attention_is_eager_on_a_cpu_for_short_rows_only(requested, max_length, device, expected):
    """finetune.attn_implementation=auto: eager for CPU training steps on rows up to EAGER_TRAINING_MAX_TOKENS
    tokens, else the model's own (None); null keeps the model's own; a name is used as given."""
    model_cfg = OmegaConf.create({"max_length": max_length})
    assert modeling.training_attention(requested, model_cfg, torch.device(device)) == expected


def test_training_steps_run_eager_and_the_trained_model_scores_with_its_own_attention(tiny_cfg, monkeypatch):
    """With the default (auto) a tiny CPU fine-tune's forward passes in training run eager attention, and the model
    it hands to the fold-end pass is back on the model's own (sdpa), as stage=embed and stage=predict load it; a
    name the model cannot use is one `error:` line."""
    from transformers.models.llama import modeling_llama

    from pipeline import context
    from pipeline.data import load_pairs
    from pipeline.errors import UserError
    from pipeline.formatting import encode_frame
    from pipeline.llm import training
    from pipeline.stages import finetune

    seen = []
    eager = modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward",
                        lambda *args, **kwargs: seen.append("eager") or eager(*args, **kwargs))
    cfg = tiny_cfg("finetune.max_steps=2")
    assert cfg.finetune.attn_implementation == "auto"
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame
    rows = training.training_rows(encode_frame(tokenizer, frame, cfg.model), None, frame["label"].to_numpy(),
                                  np.arange(32), False)
    model, stats = finetune.train_fold(context.open_run(cfg, "finetune"), 0, source, tokenizer, rows)
    assert stats["global_step"] == 2 and len(seen) == 2 * cfg.model.tiny.num_hidden_layers  # 2 steps, every layer
    assert model.get_base_model().config._attn_implementation == "sdpa"
    seen.clear()
    with torch.no_grad():
        model(**{k: torch.tensor([v]) for k, v in {"input_ids": rows[0]["input_ids"]}.items()})
    assert seen == []  # scoring: the model's own attention
    with pytest.raises(UserError, match="finetune.attn_implementation=no_such_kernel"):
        with modeling.attention_for_training(model, "no_such_kernel"):
            pass
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_a_lora_pair_with_b_zero_counts_as_absent_in_the_scoring_fingerprint():
    """Adapters that differ only in the A of a LoRA pair whose B is zero score alike (B A x = 0): equal
    fingerprints; any non-zero B, or another head, tells them apart."""
    from pipeline.llm.adapters import scoring_fingerprint

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    head = {"base_model.model.score.weight": torch.ones(3, 4)}
    zero_b = {key.format("A"): torch.randn(2, 4), key.format("B"): torch.zeros(4, 2), **head}
    other_a = {**zero_b, key.format("A"): torch.randn(2, 4)}
    assert scoring_fingerprint(zero_b) == scoring_fingerprint(other_a)
    assert scoring_fingerprint(zero_b) != scoring_fingerprint({**zero_b, key.format("B"): torch.full((4, 2), 1e-8)})
    assert scoring_fingerprint(zero_b) != scoring_fingerprint({**zero_b, "base_model.model.score.weight":
                                                               torch.full((3, 4), 2.0)})


@pytest.mark.parametrize("head_init", ["verdict_tokens", "random"])
def test_frozen_folds_share_one_test_pass_with_the_features_each_fold_gives(tiny_cfg, monkeypatch, head_init):
    """The frozen path (finetune.train=false): with the zero-shot head every fold is the same model (LoRA B = 0), so
    the test rows are scored once and the other folds take that pass, bit for bit what their own passes give (a run
    with the sharing turned off); with random heads the folds differ and each scores its own. stage=embed / predict
    re-making a deleted fold pass take the same shortcut without loading the model."""
    from pipeline import feature_table, layout
    from pipeline.llm import modeling as llm_modeling
    from pipeline.stages import finetune

    passes = []
    write = embed_passes.write_test_pass
    monkeypatch.setattr(embed_passes, "write_test_pass", lambda ctx, folder, k, *rest: passes.append(k) or
                        write(ctx, folder, k, *rest))
    frozen = ("finetune.train=false", f"finetune.head_init={head_init}")
    cfg = tiny_cfg(*frozen, "exp_name=shared")
    finetune.run(cfg)
    shared_passes = list(passes)
    with monkeypatch.context() as off:
        off.setattr(embed_passes, "written_twin", lambda *args: None)
        passes.clear()
        alone = tiny_cfg(*frozen, "exp_name=alone")
        finetune.run(alone)
        assert passes == [0, 1, 2]
    folders = [feature_table.test_folder(context_of(c), first_fold_state(c)) for c in (cfg, alone)]
    for k in range(3):
        shared, own = (pd.read_parquet(layout.test_fold_features(f, k)) for f in folders)
        pd.testing.assert_frame_equal(shared, own, check_exact=True)
    if head_init == "random":
        assert shared_passes == [0, 1, 2]
        return
    assert shared_passes == [0]
    for k in (1, 2):
        layout.test_fold_features(folders[0], k).unlink()
    monkeypatch.setattr(llm_modeling, "load_classifier", lambda *args, **kwargs: pytest.fail("no pass is needed"))
    passes.clear()
    embed_passes.extract_missing(context_of(cfg), feature_table.finetune_fold_states(context_of(cfg)), {}, [],
                                 with_test=True)
    assert passes == [] and all(layout.test_fold_features(folders[0], k).exists() for k in (1, 2))


def test_the_predictor_scores_alike_folds_once_with_the_features_each_gives(tiny_cfg, monkeypatch):
    """The Predictor (and so an export) shares a pass between fold adapters that score alike, as stage=predict does:
    one pass for the frozen path's three folds, features equal to three passes to the bit."""
    from pipeline.data import load_pairs
    from pipeline.predictor import Predictor
    from pipeline.stages import finetune

    cfg = tiny_cfg("finetune.train=false", "finetune.head_init=verdict_tokens")
    finetune.run(cfg)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    adapters = [context_of(cfg).layout.adapter(k) for k in range(3)]
    frame = load_pairs(inputs.data_paths(cfg).test, with_labels=False).frame
    calls = []
    pass_features = embed_passes.pass_features
    monkeypatch.setattr(embed_passes, "pass_features", lambda *args, **kwargs: calls.append(1) or
                        pass_features(*args, **kwargs))
    shared = Predictor(cfg, source, adapters, None, {}, [], {}, "cpu")
    assert shared.adapter_twins == {1: 0, 2: 0}
    features = shared.features(frame)
    assert len(calls) == 1
    alone = Predictor(cfg, source, adapters, None, {}, [], {}, "cpu")
    alone._twins = {}
    expected = alone.features(frame)
    assert len(calls) == 4
    for name, column in expected.passes.columns().items():
        np.testing.assert_array_equal(features.passes.columns()[name], column)


def context_of(cfg):
    from pipeline import context

    return context.open_run(cfg, "embed", record=False)


def first_fold_state(cfg):
    from pipeline import feature_table

    return feature_table.finetune_fold_states(context_of(cfg))[0]
