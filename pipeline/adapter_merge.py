"""Scoring with the active LoRA adapter merged into the base weights, and the base weights restored bit for bit.

An unmerged LoRA linear costs the base matmul plus two skinny ones, a scaling and an add per call: on a CPU with
matrix units that tripled a scoring pass (scripts/bench_embed.py). Merged, each linear is one matmul. The merge
rounds W + scale * B A once into the weights' dtype, so features agree with the unmerged pass within that dtype's
rounding (tests/test_speed_paths.py bounds it by the bf16-vs-fp32 difference). The merge happens on the loaded
model in place; the original weights are kept on the CPU and copied back afterwards, so the next fold's adapter, the
base-model vectors and a later training step see the same base weights as before, to the bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


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


@contextmanager
def merged_lora(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, every mergeable LoRA layer of `model` runs as one linear with its active adapter merged in;
    on leaving (also on an error) the base weights are what they were, bit for bit. Yields how many layers were
    merged (0 when disabled or when nothing can be merged: the block then runs the model as it is)."""
    layers = _mergeable_layers(model) if enabled else []
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                bias = None if base.bias is None else base.bias.detach().to("cpu", copy=True)
                saved.append((layer, base.weight.detach().to("cpu", copy=True), bias))
                layer.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, weight, bias in saved:
                if layer.merged:
                    layer.unmerge()  # peft's bookkeeping; its subtraction is not exact, the copy below is
                base = layer.get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
