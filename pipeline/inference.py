"""One batched forward pass over encoded pairs: the head's logits and, optionally, pooled response vectors.

Rows are sorted by length and packed into batches under a token budget, padded per batch (either side: the
head pools the last non-pad token and spans are shifted by each row's offset). The vectors come from a forward hook on one module's output, so only that
layer's hidden states are kept, and from the same pass that produces the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.formatting import EncodedPair


@dataclass
class PassOutput:
    logits: np.ndarray                 # (n, 3) float32
    vec_a: np.ndarray | None = None    # (n, hidden) float32, response_a span pooled
    vec_b: np.ndarray | None = None


def length_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Row indices grouped longest-first so that rows x padded length stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = (len(current) + 1) * longest > batch_tokens or (max_rows is not None and len(current) >= max_rows)
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Padded input_ids, attention_mask, and each row's offset (where its first token landed)."""
    width = -(-max(len(r) for r in rows) // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for j, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[j, start: start + len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[j, start: start + len(row)] = 1
        offsets.append(start)
    return ids, mask, offsets


def span_weights(spans: Sequence[tuple[int, int]], width: int, pooling: str) -> torch.Tensor:
    """(batch, width) weights that pool a span: uniform over it (mean) or one-hot on its last token (last).
    An empty span pools to a zero vector."""
    weights = torch.zeros((len(spans), width), dtype=torch.float32)
    for j, (start, end) in enumerate(spans):
        if end <= start:
            continue
        if pooling == "mean":
            weights[j, start:end] = 1.0 / (end - start)
        elif pooling == "last":
            weights[j, end - 1] = 1.0
        else:
            raise ValueError(f"unknown pooling {pooling}")
    return weights


def shift(span: tuple[int, int], offset: int) -> tuple[int, int]:
    return span[0] + offset, span[1] + offset


def capture_module(model, layer: int):
    """The module whose output is the hidden state to pool: the final norm for -1, else decoder layer `layer`."""
    backbone = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    return backbone.norm if layer == -1 else backbone.layers[layer]


@torch.inference_mode()
def forward_pass(model, encoded: Sequence[EncodedPair], pad_id: int, batch_tokens: int, on: torch.device,
                 dtype: torch.dtype, pool_layer: int | None = None, pooling: str = "mean",
                 padding_side: str = "right", max_rows: int | None = None, desc: str | None = None) -> PassOutput:
    """Logits for every row and, when `pool_layer` is given, mean/last-pooled response_a and response_b vectors."""
    n = len(encoded)
    logits = np.zeros((n, 3), dtype=np.float32)
    vec_a = vec_b = None
    captured: list[torch.Tensor] = []
    handle = None
    if pool_layer is not None:
        def keep_output(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
        handle = capture_module(model, pool_layer).register_forward_hook(keep_output)
    try:
        batches = length_batches([len(e.input_ids) for e in encoded], batch_tokens, max_rows)
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            ids, mask, offsets = pad_batch([encoded[i].input_ids for i in batch], pad_id, padding_side)
            captured.clear()
            with torch.autocast(device_type=on.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(input_ids=ids.to(on), attention_mask=mask.to(on))
            logits[batch] = out.logits.float().cpu().numpy()
            if pool_layer is not None:
                hidden = captured[0].float()
                if vec_a is None:
                    vec_a = np.zeros((n, hidden.shape[-1]), dtype=np.float32)
                    vec_b = np.zeros_like(vec_a)
                width = hidden.shape[1]
                for spans, target in (([shift(encoded[i].span_a, o) for i, o in zip(batch, offsets)], vec_a),
                                      ([shift(encoded[i].span_b, o) for i, o in zip(batch, offsets)], vec_b)):
                    weights = span_weights(spans, width, pooling).to(hidden.device)
                    target[batch] = torch.bmm(weights.unsqueeze(1), hidden).squeeze(1).cpu().numpy()
    finally:
        if handle is not None:
            handle.remove()
    return PassOutput(logits, vec_a, vec_b)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
