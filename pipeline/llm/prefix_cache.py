"""Train the top layers only, on cached activations of the frozen ones below (finetune.cache_prefix).

With LoRA on the top layers only (`finetune.top_layers`, or `finetune.lora.layers_to_transform`), every layer
below the first trained one is frozen: it gives each row the same output in every epoch and every fold, so that
output is computed once per row and run (no grad, batched by length; `training.PrefixStore`) and kept in memory.
During training those layers are replaced by stand-ins that hand the batch's cached output to the first trained
layer; the embeddings, the attention mask, the rotary positions, the
layers above, the head's pooling and the loss are the model's own, so a cached step computes what an uncached one
computes (tested: same loss and gradients). The cache takes rows x tokens x hidden x 2 bytes (bf16/fp16; 4 in fp32);
above `finetune.cache_prefix_max_gb` the fine-tune runs uncached, and says so; so does one that trains every layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.llm.inference import backbone, length_batches, pad_batch

log = logging.getLogger(__name__)


class CachedPrefix(nn.Module):
    """Stands in for one frozen decoder layer below the first trained one. The lowest returns the batch's cached
    output of the last frozen layer (set before each step); the others pass their input through."""

    def __init__(self, replaced: nn.Module, lowest: bool):
        super().__init__()
        self.lowest = lowest
        self.batch: torch.Tensor | None = None
        # Gemma-2 picks each layer's mask (sliding / full) by this attribute.
        self.attention_type = getattr(replaced, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        if not self.lowest:
            return hidden_states
        if self.batch is None or self.batch.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError("the cached prefix of this batch was not set (finetune.cache_prefix)")
        return self.batch.to(hidden_states.dtype)


def first_trained_layer(model) -> int | None:
    """The lowest decoder layer the LoRA model trains (`layers_to_transform`, as finetune.top_layers or
    finetune.lora set it); None when there is no frozen layer below it to cache (every layer trains)."""
    layers = model.peft_config["default"].layers_to_transform
    if layers is None:
        return None
    first = min([layers] if isinstance(layers, int) else layers)
    return first if first >= 1 else None


def cache_gb(lengths: list[int], hidden: int, dtype: torch.dtype) -> float:
    return sum(lengths) * hidden * torch.finfo(dtype).bits / 8 / 2 ** 30


@torch.inference_mode()
def compute(model, input_ids: list[list[int]], first: int, pad_id: int, batch_tokens: int, on: torch.device,
            dtype: torch.dtype, max_padding: float | None = None) -> list[torch.Tensor]:
    """Each row's output of decoder layer `first - 1` (its own length, no padding), stored in `dtype` on the CPU.
    The pass stops there: the layers above are not run."""
    body = backbone(model)
    outputs: dict[str, torch.Tensor] = {}

    class Stop(Exception):
        pass

    def keep(_module, _inputs, output):
        outputs["h"] = output[0] if isinstance(output, tuple) else output
        raise Stop

    handle = body.layers[first - 1].register_forward_hook(keep)
    rows: list[torch.Tensor | None] = [None] * len(input_ids)
    was_training = model.training
    model.eval()
    try:
        for batch in length_batches([len(r) for r in input_ids], batch_tokens, max_padding=max_padding):
            ids, mask, _ = pad_batch([input_ids[i] for i in batch], pad_id)
            with torch.autocast(device_type=on.type, dtype=dtype, enabled=dtype != torch.float32):
                try:
                    model(input_ids=ids.to(on), attention_mask=mask.to(on))
                except Stop:
                    pass
            for j, i in enumerate(batch):
                rows[i] = outputs["h"][j, : len(input_ids[i])].to("cpu", dtype).clone()
    finally:
        handle.remove()
        model.train(was_training)
    return rows


@dataclass
class PrefixCache:
    """The frozen layers swapped for stand-ins while the top layers train; `restore` puts them back (the fold-end
    pass and the saved adapter need the whole model)."""

    body: nn.Module
    frozen: list[nn.Module]
    stand_ins: list[CachedPrefix]

    @classmethod
    def install(cls, model, first: int) -> "PrefixCache":
        body = backbone(model)
        frozen = list(body.layers[:first])
        stand_ins = [CachedPrefix(layer, lowest=k == first - 1) for k, layer in enumerate(frozen)]
        body.layers = nn.ModuleList([*stand_ins, *body.layers[first:]])
        return cls(body, frozen, stand_ins)

    def set_batch(self, prefix: torch.Tensor) -> None:
        self.stand_ins[-1].batch = prefix

    def restore(self) -> None:
        self.body.layers = nn.ModuleList([*self.frozen, *self.body.layers[len(self.frozen):]])


def pad_prefixes(prefixes: list[torch.Tensor], width: int) -> torch.Tensor:
    """(batch, width, hidden), right-padded with zeros like the ids (the mask hides the padding)."""
    out = prefixes[0].new_zeros((len(prefixes), width, prefixes[0].shape[1]))
    for j, p in enumerate(prefixes):
        out[j, : p.shape[0]] = p
    return out
