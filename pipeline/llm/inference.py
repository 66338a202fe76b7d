"""One batched forward pass over encoded pairs: the head's logits and, optionally, pooled span vectors.

Rows are sorted by length and packed into batches under a token budget, padded per batch (either side: the
head pools the last non-pad token and spans are shifted by each row's offset). The vectors come from forward
hooks on the captured layers, so only those layers' hidden states are kept, and from the same pass that
produces the logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.feature_table import LM_LAYER, LM_SPANS, SPANS  # pooled per captured layer; verdict = the last token
from pipeline.formatting import EncodedPair

LM_CHUNK = 1024  # positions per LM-head matmul: chunk x vocab fp32 logits stay ~200 MB for a 49k vocabulary


@dataclass
class PassOutput:
    logits: np.ndarray                                               # (n, 3) float32
    vectors: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (layer, span) -> (n, hidden) float32


@dataclass(frozen=True)
class LMHead:
    """The LM head the likelihood features read (vocab x hidden; see modeling.output_embeddings) and Gemma-2's
    final logit soft-cap (None elsewhere)."""

    weight: torch.Tensor
    softcap: float | None = None


def span_likelihoods(hidden: torch.Tensor, ids: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]],
                     lm_head: LMHead) -> np.ndarray:
    """(batch, len(spans[0]), 2): per row and span, the mean log-likelihood the LM gives the span's tokens (each
    predicted from the position before it, so from everything earlier in the pair) and the mean entropy of those
    predictions. `hidden` is the final norm's output (what the LM head reads); an empty span gives zeros."""
    rows, positions, targets, slots = [], [], [], []
    n_spans = len(spans[0])
    for j, row_spans in enumerate(spans):
        for s, (start, end) in enumerate(row_spans):
            first = max(start, 1)
            rows += [j] * (end - first)
            positions += range(first - 1, end - 1)
            targets += ids[j, first:end].tolist()
            slots += [j * n_spans + s] * (end - first)
    sums = torch.zeros((len(spans) * n_spans, 2), dtype=torch.float64)
    counts = torch.zeros(len(spans) * n_spans, dtype=torch.float64)
    weight = lm_head.weight.to(hidden.device, torch.float32)  # log-probabilities of bf16 logits are too coarse
    on = hidden.device
    for lo in range(0, len(rows), LM_CHUNK):
        part = slice(lo, lo + LM_CHUNK)
        h = hidden[torch.as_tensor(rows[part], device=on), torch.as_tensor(positions[part], device=on)]
        logits = h.float() @ weight.T
        if lm_head.softcap:
            logits = torch.tanh(logits / lm_head.softcap) * lm_head.softcap
        logp = torch.log_softmax(logits, dim=-1)
        loglik = logp.gather(1, torch.as_tensor(targets[part], device=on)[:, None])[:, 0]
        entropy = -(logp.exp() * logp).sum(-1)
        slot = torch.as_tensor(slots[part])
        sums.index_add_(0, slot, torch.stack([loglik, entropy], 1).double().cpu())
        counts.index_add_(0, slot, torch.ones(len(slot), dtype=torch.float64))
    means = sums / counts.clamp(min=1)[:, None]
    return means.reshape(len(spans), n_spans, 2).float().numpy()


MIN_BATCH_SHARE = 8  # a batch closes early only once it holds batch_tokens / this many real tokens (matmuls keep
                     # their rate: on a CPU a decoder layer's linears ran as fast at 1,024 tokens as at 8,192)


def length_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None,
                   max_padding: float | None = None) -> list[list[int]]:
    """Row indices grouped longest-first so that rows x padded length stays within `batch_tokens`. A batch also
    closes early where the next row would make more than `max_padding` of it padding (None: never; the pipeline
    passes embed.max_batch_padding), once it holds batch_tokens / MIN_BATCH_SHARE real tokens: on short rows (the
    demo data: 20 to 150 tokens) filling the budget alone padded half of every batch. Padding only rises as shorter
    rows join, so the cut is well-defined."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    enough = batch_tokens / MIN_BATCH_SHARE
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        padded = (len(current) + 1) * longest
        full = padded > batch_tokens or (max_rows is not None and len(current) >= max_rows)
        padding = 1 - (real + lengths[i]) / padded
        early = max_padding is not None and real >= enough and padding > max_padding
        if current and (full or early):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def padding_share(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """The share of the padded tokens of these batches that are padding (each batch padded to its longest row)."""
    return 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


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


def backbone(model):
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def layer_name(fraction: float) -> str:
    """Name of a captured layer given as a fraction of depth: 1.0 -> h100 (the head's input), 0.5 -> h050."""
    return f"h{round(float(fraction) * 100):03d}"


def capture_module(model, fraction: float):
    """The module whose output is the hidden state at `fraction` of the depth: the final norm for 1.0 (what the
    head reads), else the output of decoder layer round(fraction * depth) - 1. Fractions carry over between
    models of different depth (SmolLM2's 30 layers, Llama-3-8B's 32)."""
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"layer fraction {fraction} is not in (0, 1]")
    body = backbone(model)
    if fraction == 1.0:
        return body.norm
    return body.layers[max(0, round(fraction * len(body.layers)) - 1)]


@torch.inference_mode()
def forward_pass(model, encoded: Sequence[EncodedPair], pad_id: int, batch_tokens: int, on: torch.device,
                 dtype: torch.dtype, layers: Sequence[float] = (), pooling: str = "mean",
                 padding_side: str = "right", max_rows: int | None = None, desc: str | None = None,
                 lm_head: LMHead | None = None, max_padding: float | None = None) -> PassOutput:
    """Logits for every row and, for each layer fraction in `layers`, the prompt / response_a / response_b spans
    pooled (mean or last token) and the verdict vector (the last token), all from the same pass: forward hooks
    keep only the captured layers' outputs. With `lm_head`, also the LM's mean log-likelihood and entropy of each
    span's tokens (vectors[("lm", span)], see span_likelihoods), from the final norm's output of the same pass."""
    n = len(encoded)
    logits = np.zeros((n, 3), dtype=np.float32)
    vectors: dict[tuple[str, str], np.ndarray] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    final = "final_norm"  # the LM head's input, kept apart from the pooled layers
    for name, fraction in [(layer_name(f), f) for f in layers] + ([(final, 1.0)] if lm_head is not None else []):
        def keep_output(_module, _inputs, output, name=name):
            captured[name] = output[0] if isinstance(output, tuple) else output
        handles.append(capture_module(model, fraction).register_forward_hook(keep_output))
    try:
        batches = length_batches([len(e.input_ids) for e in encoded], batch_tokens, max_rows, max_padding)
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            ids, mask, offsets = pad_batch([encoded[i].input_ids for i in batch], pad_id, padding_side)
            captured.clear()
            with torch.autocast(device_type=on.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(input_ids=ids.to(on), attention_mask=mask.to(on))
            logits[batch] = out.logits.float().cpu().numpy()
            if not captured:
                continue
            width = ids.shape[1]
            rows = [encoded[i] for i in batch]
            span_sets = [[shift(r.span_prompt, o) for r, o in zip(rows, offsets)],
                         [shift(r.span_a, o) for r, o in zip(rows, offsets)],
                         [shift(r.span_b, o) for r, o in zip(rows, offsets)],
                         [(o + len(r.input_ids) - 1, o + len(r.input_ids)) for r, o in zip(rows, offsets)]]
            if lm_head is not None:
                lm_spans = [[span_sets[SPANS.index(s)][j] for s in LM_SPANS] for j in range(len(batch))]
                stats = span_likelihoods(captured.pop(final), ids, lm_spans, lm_head)
                for s, span in enumerate(LM_SPANS):
                    vectors.setdefault((LM_LAYER, span), np.zeros((n, stats.shape[-1]), dtype=np.float32))[batch] = \
                        stats[:, s]
            # (batch, spans, width): one batched matmul per layer pools every span at once.
            weights = torch.stack([span_weights(spans, width, pooling if s < 3 else "last")
                                   for s, spans in enumerate(span_sets)], dim=1)
            for name, hidden in captured.items():
                pooled = torch.bmm(weights.to(hidden.device), hidden.float()).cpu().numpy()
                for s, span in enumerate(SPANS):
                    key = (name, span)
                    if key not in vectors:
                        vectors[key] = np.zeros((n, pooled.shape[-1]), dtype=np.float32)
                    vectors[key][batch] = pooled[:, s]
    finally:
        for handle in handles:
            handle.remove()
    return PassOutput(logits, vectors)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
