"""LoRA adapters beyond loading them: a pass with the active adapter merged into the base weights (restored bit for
bit afterwards), and the fold adapters averaged into one (embed.test_adapters=averaged).

Merging: an unmerged LoRA linear costs the base matmul plus two skinny ones, a scaling and an add per call: on a CPU
with matrix units that tripled a scoring pass (scripts/bench_embed.py). Merged, each linear is one matmul. The merge
rounds W + scale * B A once into the weights' dtype, so features agree with the unmerged pass within that dtype's
rounding (tests/test_speed_paths.py bounds it by the bf16-vs-fp32 difference). Each merged linear gets a merged copy
of its weight for the pass while the original tensor is set aside untouched and put back afterwards, so the next
fold's adapter, the base-model vectors and a later training step see the same base weights as before, to the bit.
The copies live on the model's device when they fit there (no transfer: on a GPU, parking an 8B model's weights in
host memory and copying them back cost 26 s per pass, 100x the pass itself); where they do not fit, the originals
wait in host memory while the merge happens in place.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from pipeline import artifacts
from pipeline.errors import UserError


def _mergeable_layers(model) -> list:
    """LoRA layers on plain floating-point linears with an active adapter. Quantised bases (bitsandbytes) are left
    alone: merging would re-quantise them, which neither keeps the features nor can be undone exactly."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        active = [name for name in module.active_adapters if name in module.lora_A]
        if type(base) is torch.nn.Linear and base.weight.is_floating_point() and active and not module.merged:
            layers.append(module)
    return layers


def _copies_fit_on_device(layers: list) -> bool:
    """Whether a second copy of these layers' weights fits beside the model on its device (the CPU: always)."""
    weights = [layer.get_base_layer().weight for layer in layers]
    if not weights or weights[0].device.type != "cuda":
        return True
    needed = sum(w.numel() * w.element_size() for w in weights)
    free, _ = torch.cuda.mem_get_info(weights[0].device)
    return needed < 0.8 * free  # headroom for the pass's activations


@contextmanager
def merged_lora(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, every mergeable LoRA layer of `model` runs as one linear with its active adapter merged in;
    on leaving (also on an error) the base weights are what they were, bit for bit. Yields how many layers were
    merged (0 when disabled or when nothing can be merged: the block then runs the model as it is)."""
    layers = _mergeable_layers(model) if enabled else []
    on_device = _copies_fit_on_device(layers)
    saved = []  # (layer, its base's original tensors: themselves on the device, else host copies)
    try:
        with torch.no_grad():
            for layer in layers:
                params = _base_params(layer)
                saved.append((layer, [p.data if on_device else p.data.to("cpu", copy=True) for p in params]))
                if on_device:  # the merge goes into a copy; the originals stay untouched
                    for param in params:
                        param.data = param.data.clone()
                layer.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, originals in saved:
                if layer.merged:
                    layer.unmerge()  # peft's bookkeeping; its subtraction is not exact, the originals below are
                for param, original in zip(_base_params(layer), originals):
                    param.data = original.to(param.device)  # on the device: the same tensor, no copy


def _base_params(layer) -> list[torch.nn.Parameter]:
    """The weight and (where there is one) the bias of a LoRA layer's base linear: what a merge changes."""
    base = layer.get_base_layer()
    return [p for p in (base.weight, base.bias) if p is not None]


def scoring_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """What scoring with an adapter (its saved tensors, or peft's state dict of a model) depends on: every tensor,
    except that a LoRA pair whose B is all zeros adds exactly nothing (B A x = 0 whatever A is) and so counts as
    absent. Fold adapters with equal fingerprints score every row the same on one base model: the frozen path's folds
    (LoRA B = 0, the same zero-shot head; only A's random start differs) need one test pass, not K."""
    import hashlib

    silent = {key for key, tensor in tensors.items() if ".lora_B." in key and not tensor.any()}
    silent |= {key.replace(".lora_B.", ".lora_A.") for key in silent}
    digest = hashlib.sha256()
    for key in sorted(set(tensors) - silent):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def saved_scoring_fingerprint(adapter: Path) -> str:
    """scoring_fingerprint of a saved adapter folder."""
    from safetensors.torch import load_file

    from pipeline.llm.modeling import check_safetensors

    weights = adapter / "adapter_model.safetensors"
    check_safetensors(weights)
    return scoring_fingerprint(load_file(str(weights)))


def model_scoring_fingerprint(model) -> str:
    """scoring_fingerprint of a PEFT model's active adapter (what save_pretrained would write)."""
    from peft import get_peft_model_state_dict

    return scoring_fingerprint(get_peft_model_state_dict(model))


def average_adapters(adapters: list[Path], target: Path) -> None:
    """Write one adapter equal to the mean of the fold adapters (fold-adapter averaging: test rows need one pass
    instead of K). LoRA: the folds' A matrices stacked and their B matrices side by side, each B scaled by its
    fold's LoRA scaling / K, at rank K*r with scaling 1, so B' A' = mean_k s_k B_k A_k exactly (the mean of the
    merged models' weight deltas). Every other saved tensor (the `score` head) is the plain mean."""
    import math
    import re

    from safetensors.torch import load_file, save_file

    configs = [artifacts.read_json(a / "adapter_config.json") for a in adapters]
    base = configs[0]
    if base.get("use_dora") or base.get("rank_pattern") or base.get("alpha_pattern"):
        raise UserError("embed.test_adapters=averaged: DoRA adapters and per-module rank_pattern / alpha_pattern "
                        "cannot be averaged exactly; use embed.test_adapters=each")
    n = len(adapters)
    from pipeline.llm.modeling import check_safetensors

    for adapter in adapters:
        check_safetensors(adapter / "adapter_model.safetensors")
    states = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    scales = [c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]) for c in configs]
    averaged = {}
    for key, first in states[0].items():
        if re.search(r"lora_(embedding_)?A", key):
            averaged[key] = torch.cat([s[key] for s in states], dim=0).contiguous()
        elif re.search(r"lora_(embedding_)?B", key):
            averaged[key] = torch.cat([s[key].float() * scale / n for s, scale in zip(states, scales)],
                                      dim=1).to(first.dtype).contiguous()
        else:
            averaged[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype).contiguous()
    rank = int(base["r"]) * n
    staging = artifacts.staging_dir(target)
    save_file(averaged, str(staging / "adapter_model.safetensors"))
    artifacts.write_json(staging / "adapter_config.json",
                         {**base, "r": rank, "lora_alpha": math.sqrt(rank) if base.get("use_rslora") else rank})
    artifacts.apply_user_mode(staging)
    artifacts.replace_dir(staging, target)
