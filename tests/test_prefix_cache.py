"""finetune.cache_prefix: training the top layers on cached activations of the frozen ones computes the same step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import inputs
from pipeline.llm import modeling, prefix_cache, training
from pipeline.data import load_pairs
from pipeline.formatting import encode_frame


# LoRA on the top layer of the tiny 2-layer model in peft's own terms (layers_to_transform with a list of target
# modules; finetune.top_layers=1 says the same, tested below).
TOP_LAYER = ("+finetune.lora.layers_to_transform=[1]",
             "finetune.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_prefix_step_gives_the_same_loss_and_gradients(tiny_cfg, family):
    """LoRA on the top decoder layer of a 2-layer tiny model: a step whose lower layer is replaced by its cached
    output (rows of different lengths, right-padded) gives the loss and every trainable gradient of the uncached
    step; restore() gives back the whole model. Gemma-2 too (it scales its embeddings and picks masks per layer)."""
    cfg = tiny_cfg(f"model.tiny.family={family}", "model.precision=fp32", "model.max_length=600", *TOP_LAYER)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame.iloc[:6]
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, None, frame["label"].to_numpy(), np.arange(6), False)
    assert len({len(r["input_ids"]) for r in rows}) > 1
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, torch.float32, cpu), cfg.model,
                              cfg.finetune.lora, False)
    with torch.no_grad():  # LoRA B starts at zero: move it, so the gradients of A are not trivially zero too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora" in n}
    assert trained and all(".layers.1." in n for n in trained)
    batch = training.PaddingCollator(tokenizer.pad_token_id)(rows)
    uncached = loss_and_grads(model, {k: v for k, v in batch.items() if k != "prefix_hidden"})

    first = prefix_cache.first_trained_layer(model)
    assert first == 1
    prefixes = prefix_cache.compute(model, [r["input_ids"] for r in rows], first, tokenizer.pad_token_id, 4096, cpu,
                                    torch.float32)
    assert [p.shape[0] for p in prefixes] == [len(r["input_ids"]) for r in rows]
    cached_batch = training.PaddingCollator(tokenizer.pad_token_id)([{**r, "prefix": p} for r, p in zip(rows, prefixes)])
    cache = prefix_cache.PrefixCache.install(model, first)
    cache.set_batch(cached_batch.pop("prefix_hidden"))
    cached = loss_and_grads(model, cached_batch)
    cache.restore()
    assert cached[0] == pytest.approx(uncached[0], abs=1e-6)
    assert set(cached[1]) == set(uncached[1])
    for name, grad in uncached[1].items():
        torch.testing.assert_close(cached[1][name], grad, atol=1e-6, rtol=1e-5)
    assert loss_and_grads(model, {k: v for k, v in batch.items() if k != "prefix_hidden"})[0] == \
        pytest.approx(uncached[0], abs=1e-6)


def test_cache_prefix_trains_a_fold_and_needs_top_layers_only(tiny_cfg, monkeypatch):
    """A fold trained with finetune.cache_prefix computes the frozen layers once for each of its rows, trains on
    the cached outputs (the cache's stand-in layers are what the Trainer's steps run through), and gives the model
    back whole."""
    from pipeline import context
    from pipeline.stages import finetune

    computed, served = [], []
    compute, set_batch = prefix_cache.compute, prefix_cache.PrefixCache.set_batch
    monkeypatch.setattr(prefix_cache, "compute", lambda model, ids, *rest: computed.append(len(ids)) or
                        compute(model, ids, *rest))
    monkeypatch.setattr(prefix_cache.PrefixCache, "set_batch", lambda self, prefix: served.append(prefix.shape) or
                        set_batch(self, prefix))
    cfg = tiny_cfg("finetune.cache_prefix=true", *TOP_LAYER, "finetune.max_steps=2")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, None, frame["label"].to_numpy(), np.arange(32), False)
    model, stats = finetune.train_fold(context.open_run(cfg, "finetune"), 0, source, tokenizer, rows)
    assert stats["global_step"] == 2
    assert computed == [len({tuple(r["input_ids"]) for r in rows})]  # every distinct row's frozen layers, once
    assert len(served) == 2 and all(shape[-1] == cfg.model.tiny.hidden_size for shape in served)  # one per step
    assert not any(isinstance(m, prefix_cache.CachedPrefix) for m in model.modules())  # the whole model is back
    computed.clear(), served.clear()
    every_layer = tiny_cfg("finetune.max_steps=2", "exp_name=every_layer")  # the default: top_layers=null
    _, stats = finetune.train_fold(context.open_run(every_layer, "finetune"), 0, source, tokenizer, rows)
    assert stats["global_step"] == 2 and computed == [] and served == []  # nothing frozen: trained uncached


def test_top_layers_puts_lora_on_the_last_layers_only(tiny_cfg):
    """finetune.top_layers=1 on the 2-layer tiny model: LoRA (all-linear's seven modules) on layer 1 only, layer 0
    frozen and cacheable; a count at or above the depth trains every layer, exactly as top_layers=null does."""
    cfg = tiny_cfg("model.precision=fp32")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    cpu = torch.device("cpu")

    def lora_model(top_layers):
        torch.manual_seed(0)
        return modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, torch.float32, cpu),
                                 cfg.model, cfg.finetune.lora, False, top_layers)

    top = lora_model(1)
    trained = [n for n, p in top.named_parameters() if p.requires_grad and "lora_A" in n]
    assert trained and all(".layers.1." in n for n in trained)
    assert {n.split(".layers.1.")[1].split(".")[1] for n in trained} == set(modeling.decoder_linear_names(top))
    assert len(modeling.decoder_linear_names(top)) == 7
    assert prefix_cache.first_trained_layer(top) == 1
    every = {n: p for n, p in lora_model(None).named_parameters()}
    deep = {n: p for n, p in lora_model(8).named_parameters()}
    assert every.keys() == deep.keys() and all(torch.equal(every[n], deep[n]) for n in every)
    assert prefix_cache.first_trained_layer(lora_model(8)) is None


@pytest.mark.parametrize("top_layers, depth, expected", [(None, 30, None), (30, 30, None), (40, 30, None),
                                                           (8, 30, list(range(22, 30))), (1, 2, [1])])
def test_lora_on_top_layers_names_the_last_layers(top_layers, depth, expected):
    """The pure mapping to peft's fields: the last N layer indices, all-linear spelled out as the layer's linears,
    a given list kept; nothing changed when every layer trains."""
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {"r": 16, "target_modules": "all-linear"}
    resolved = modeling.lora_on_top_layers(lora, top_layers, depth, linears)
    assert resolved.get("layers_to_transform") == expected
    assert resolved["target_modules"] == (linears if expected else "all-linear")
    listed = modeling.lora_on_top_layers({"r": 16, "target_modules": ["q_proj", "v_proj"]}, top_layers, depth, linears)
    assert listed["target_modules"] == ["q_proj", "v_proj"]


def test_folds_share_one_prefix_pass_and_a_fold_job_trains_what_the_whole_run_trains(tiny_cfg, monkeypatch):
    """Over a run, the frozen layers run once, over every row any fold trains on (both orientations under swap
    augmentation), not once per fold; fold 1 trained alone as its own job (finetune.folds=[1]) fills the store the
    same way and gets the adapter the whole run gave it, to the bit."""
    from safetensors.torch import load_file

    from pipeline import context
    from pipeline.stages import finetune

    computed = []
    compute = prefix_cache.compute
    monkeypatch.setattr(prefix_cache, "compute", lambda model, ids, *rest: computed.append(len(ids)) or
                        compute(model, ids, *rest))
    whole = tiny_cfg("finetune.top_layers=1", "finetune.max_steps=2", "exp_name=whole")
    finetune.run(whole)
    ctx = context.open_run(whole, "finetune")
    tokenizer = modeling.load_tokenizer(modeling.base_model_dir(whole.model, whole.paths.model_cache_dir), whole.model)
    distinct = {tuple(pair.input_ids) for swap in (False, True)
                for pair in encode_frame(tokenizer, ctx.train.frame, whole.model, swap=swap)}
    assert whole.finetune.swap_augmentation and computed == [len(distinct)]
    computed.clear()
    alone = tiny_cfg("finetune.top_layers=1", "finetune.max_steps=2", "exp_name=alone", "finetune.folds=[1]")
    finetune.run(alone)
    assert computed == [len(distinct)]
    weights = [load_file(str(context.open_run(cfg, "finetune").layout.adapter(1) / "adapter_model.safetensors"))
               for cfg in (whole, alone)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
