"""Turn (prompt, response_a, response_b) into token ids with per-segment budgets and the response spans.

Each segment is tokenised on its own and truncated to its budget, so one long response cannot starve the
other, and the token span of each response is known exactly (the embed stage pools over it). The sequence
starts with the tokens the tokenizer itself puts before a text by default (Llama-3's `<|begin_of_text|>`,
Gemma's `<bos>`; nothing for SmolLM2 or Qwen2, which add none) and ends with a fixed verdict marker, never with a
pad/EOS token: classification heads pool the last non-pad token, which breaks when pad == EOS (SmolLM2, Llama-3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from pipeline.errors import UserError

# Text around the three segments. The ids of these markers are fixed per tokenizer.
MARKERS = ("Which response better answers the user?\n\n## Prompt\n", "\n\n## Response A\n", "\n\n## Response B\n",
           "\n\n## Verdict:")


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    span_a: tuple[int, int]   # [start, end) of response_a's tokens in input_ids
    span_b: tuple[int, int]
    n_truncated: int          # tokens cut from the three segments together
    span_prompt: tuple[int, int] = (0, 0)


def segment_text(turns: Sequence[str]) -> str:
    """One segment's text: a single turn as is, several turns numbered."""
    if len(turns) == 1:
        return turns[0]
    return "\n".join(f"[turn {i}] {turn}" for i, turn in enumerate(turns, 1))


def allocate_budget(lengths: Sequence[int], total: int, caps: Sequence[int | None]) -> list[int]:
    """Split `total` tokens between segments fairly (water-filling): a segment shorter than its share keeps its
    length and gives the rest to the others; `caps` bounds a segment's allocation (None = no bound)."""
    want = [min(n, cap) if cap is not None else n for n, cap in zip(lengths, caps)]
    alloc = [0] * len(want)
    remaining = total
    active = [i for i, w in enumerate(want) if w > 0]
    while active and remaining > 0:
        share = remaining // len(active)
        if share == 0:
            for i in active[:remaining]:
                alloc[i] += 1
            break
        still_wanting = []
        for i in active:
            give = min(share, want[i] - alloc[i])
            alloc[i] += give
            remaining -= give
            if alloc[i] < want[i]:
                still_wanting.append(i)
        active = still_wanting
    return alloc


TRUNCATION_SIDES = ("left", "right", "head_tail")


def truncate(ids: Sequence[int], keep: int, side: str) -> list[int]:
    """Keep `keep` tokens: `left` truncation drops the start (keeps the end), `right` drops the end, `head_tail`
    drops the middle (keeps the first half and the last half: how a response opens and how it concludes)."""
    if keep >= len(ids):
        return list(ids)
    if keep <= 0:
        return []
    if side == "head_tail":
        head = (keep + 1) // 2
        return list(ids[:head]) + list(ids[len(ids) - (keep - head):])
    return list(ids[-keep:]) if side == "left" else list(ids[:keep])


def assemble(marker_ids: Sequence[Sequence[int]], prompt_ids: Sequence[int], a_ids: Sequence[int],
             b_ids: Sequence[int], max_length: int, prompt_max_fraction: float, truncation_side: str,
             prefix_ids: Sequence[int] = (), length_key: str = "model.max_length") -> EncodedPair:
    """Concatenate the prefix (the tokenizer's BOS, if it adds one), markers and budgeted segments; return ids and
    the spans. `length_key` names the setting `max_length` came from in an error."""
    if truncation_side not in TRUNCATION_SIDES:
        raise UserError(f"model.truncation_side={truncation_side}: use one of {', '.join(TRUNCATION_SIDES)}")
    fixed = len(prefix_ids) + sum(len(m) for m in marker_ids)
    available = max_length - fixed
    if available < 3:
        raise UserError(f"{length_key}={max_length} leaves no room for text after the {fixed} template tokens; "
                        f"raise it to at least {fixed + 3}")
    lengths = [len(prompt_ids), len(a_ids), len(b_ids)]
    budgets = allocate_budget(lengths, available, [max(1, int(available * prompt_max_fraction)), None, None])
    segments = [truncate(ids, n, truncation_side) for ids, n in zip((prompt_ids, a_ids, b_ids), budgets)]
    ids: list[int] = list(prefix_ids)
    spans = []
    for marker, segment in zip(marker_ids, segments):
        ids += marker
        start = len(ids)
        ids += segment
        spans.append((start, len(ids)))
    ids += marker_ids[3]
    return EncodedPair(ids, spans[1], spans[2], n_truncated=sum(lengths) - sum(budgets), span_prompt=spans[0])


def named_markers(model_a: str, model_b: str) -> tuple[str, str]:
    """The response markers naming each response's model (model.show_model_names): never truncated, outside the
    response spans."""
    return (MARKERS[1].replace("Response A", f"Response A (by {model_a})"),
            MARKERS[2].replace("Response B", f"Response B (by {model_b})"))


def encode_pairs(tokenize: Callable[[list[str]], list[list[int]]], prompts: Sequence[Sequence[str]],
                 responses_a: Sequence[Sequence[str]], responses_b: Sequence[Sequence[str]], max_length: int,
                 prompt_max_fraction: float, truncation_side: str, prefix_ids: Sequence[int] = (),
                 length_key: str = "model.max_length",
                 model_names: tuple[Sequence[str], Sequence[str]] | None = None) -> list[EncodedPair]:
    """Encode many rows. `tokenize` maps texts to token ids without special tokens (batched for speed);
    `prefix_ids` start every sequence (see leading_special_ids); `model_names` (names of A's and B's models per
    row) go into the response markers."""
    marker_ids = tokenize(list(MARKERS))
    n = len(prompts)
    texts = [segment_text(t) for t in prompts] + [segment_text(t) for t in responses_a] + \
        [segment_text(t) for t in responses_b]
    ids = tokenize(texts)
    markers = [marker_ids] * n
    if model_names is not None:
        named = [named_markers(a, b) for a, b in zip(*model_names)]
        named_ids = tokenize([m for pair in named for m in pair])
        markers = [[marker_ids[0], named_ids[2 * i], named_ids[2 * i + 1], marker_ids[3]] for i in range(n)]
    return [assemble(markers[i], ids[i], ids[n + i], ids[2 * n + i], max_length, prompt_max_fraction,
                     truncation_side, prefix_ids, length_key) for i in range(n)]


def tokenizer_fn(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Adapter from a HF tokenizer to the `tokenize` callable above."""
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenize


def leading_special_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text by default (its BOS, e.g. Llama-3's `<|begin_of_text|>`,
    Gemma's `<bos>`; none for SmolLM2 or Qwen2). Asked of the tokenizer, not looked up by family; tokens it adds
    after the text (an EOS) are left out: the verdict marker must stay last."""
    probe = "Which response"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return list(full[:start])
    raise UserError(f"the tokenizer ({type(tokenizer).__name__}) encodes a text differently with and without its "
                    "special tokens; the pipeline cannot tell where its BOS ends")


def encode_frame(tokenizer, frame, model_cfg, swap: bool = False, max_length: int | None = None) -> list[EncodedPair]:
    """Encode tidy rows (see pipeline.data) with the model's formatting settings; `swap` exchanges A and B;
    `max_length` replaces model.max_length (the scoring passes' own length, embed.max_length)."""
    first, second = ("response_b", "response_a") if swap else ("response_a", "response_b")
    names = None
    if model_cfg.get("show_model_names"):
        check_model_names(frame, "the rows to score")
        name_first, name_second = ("model_b", "model_a") if swap else ("model_a", "model_b")
        names = (list(frame[name_first]), list(frame[name_second]))
    return encode_pairs(tokenizer_fn(tokenizer), list(frame["prompt"]), list(frame[first]), list(frame[second]),
                        int(max_length or model_cfg.max_length), model_cfg.prompt_max_fraction,
                        model_cfg.truncation_side, leading_special_ids(tokenizer),
                        "embed.max_length" if max_length else "model.max_length", names)


MODEL_NAME_COLUMNS = ("model_a", "model_b")


def check_model_names(frame, source: str) -> None:
    """model.show_model_names=true formats every row with its models' names: rows without them cannot be scored."""
    missing = [c for c in MODEL_NAME_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{source}: no {' / '.join(missing)} column, and this model was made with "
                        "model.show_model_names=true (its formatting names each response's model); such an experiment "
                        "can only score rows that name their models, e.g. a teacher's train rows")


def template_tokens(tokenizer) -> int:
    """The tokens every pair spends on the template (the tokenizer's BOS and the markers): a length setting must
    leave room beyond them."""
    return len(leading_special_ids(tokenizer)) + sum(len(ids) for ids in tokenizer_fn(tokenizer)(list(MARKERS)))
