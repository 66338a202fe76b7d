"""A GPU memory plan before renting (pure arithmetic, no GPU, no weights): what one device holds while fine-tuning
and while scoring, for a model shape and the run's settings, and the largest per-device batch that fits a card.

Per device, training: the base weights at their quantisation (bitsandbytes keeps the embeddings in the compute
dtype; NF4 with double quantisation costs 4.127 bits a weight), the LoRA weights and `score` head in fp32 with
their gradients and AdamW's two moments (16 bytes a parameter), and the activations autograd keeps for backward.
Activations are counted per token per layer from what each op saves (2-byte activations): the layer norms' and
projections' inputs, q / k / v and the attention output, the four MLP tensors (gate, up, act, product), and with
eager attention the attention probabilities (heads x length). With gradient checkpointing only each layer's input
is kept, plus one layer's activations and their gradients while it is recomputed. Scoring (no gradients): the
weights, one layer's activations for `embed.batch_tokens` tokens, and the captured layers' fp32 hidden states.
A fixed allowance covers the CUDA context and allocator slack. Estimates, not measurements:
`scripts/bench_memory.py` compares them with what a run really used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1024 ** 3
ACTIVATION_BYTES = 2            # bf16 / fp16 activations
TRAINABLE_BYTES = 16            # fp32 weight + fp32 gradient + AdamW's two fp32 moments
CONTEXT_GB = 1.0                # CUDA context, cuBLAS workspaces, allocator fragmentation
WEIGHT_BYTES = {"4bit": 4.127 / 8, "8bit": 1.0 + 4 / 64}  # NF4 + double-quantised absmax; int8 + scales
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory plan needs, from a transformers config (dict)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norms_per_layer: int = 2    # Gemma-2 has four (pre/post attention and feed-forward)

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(hidden, int(config["num_hidden_layers"]), heads,
                   int(config.get("num_key_value_heads") or heads),
                   int(config.get("head_dim") or hidden // heads), int(config["intermediate_size"]),
                   int(config["vocab_size"]), 4 if config.get("model_type") == "gemma2" else 2)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear projection of one layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projection_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings and norms: never quantised."""
        return self.vocab * self.hidden + self.layers * self.norms_per_layer * self.hidden + self.hidden

    def activation_elements_per_token_layer(self, eager_attention: bool, length: int) -> int:
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        # norm inputs, the two norm outputs the projections read, q/k/v, rotated q/k, attention output, MLP tensors
        saved = self.norms_per_layer * h + 2 * h + 3 * q + 3 * kv + 4 * i
        return saved + (2 * self.heads * length if eager_attention else 0)


@dataclass
class MemoryPlan:
    weights_gb: float
    lora_gb: float                   # LoRA + head: weights, gradients, optimizer states
    activations_gb: float            # at per_device_batch_size, with the run's gradient checkpointing
    activations_per_row_gb: float
    activations_per_row_no_checkpointing_gb: float
    scoring_gb: float                # the fold-end / test pass at embed.batch_tokens (without the weights)
    context_gb: float
    total_gb: float                  # the larger of training and scoring, per device
    per_device_batch_size: int
    gpu_memory_gb: float
    max_batch_size: int              # the largest per-device batch that fits gpu_memory_gb (0: none)
    fits: bool

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def table(self) -> str:
        rows = [("base weights", self.weights_gb), ("LoRA + head, grads, AdamW", self.lora_gb),
                (f"activations, batch {self.per_device_batch_size}", self.activations_gb),
                ("scoring pass (embed.batch_tokens)", self.scoring_gb), ("CUDA context and slack", self.context_gb),
                ("total per device", self.total_gb)]
        lines = ["| GPU memory plan | GB |", "|---|---|"] + [f"| {name} | {value:.2f} |" for name, value in rows]
        lines.append(f"| largest per-device batch within {self.gpu_memory_gb:g} GB | {self.max_batch_size} |")
        return "\n".join(lines)


def lora_params(shape: ModelShape, r: int, targets, layers: int | None = None) -> int:
    """LoRA parameters: r x (in + out) for each targeted projection (`all-linear`: all seven) of each trained layer
    (`layers`: the top ones, finetune.top_layers; None = every layer)."""
    chosen = PROJECTIONS if targets in (None, "all-linear") else [t for t in PROJECTIONS if t in set(targets)]
    return trained_layer_count(shape, layers) * sum(r * sum(shape.projection_shapes()[t]) for t in chosen)


def trained_layer_count(shape: ModelShape, top_layers: int | None) -> int:
    return shape.layers if top_layers is None else min(int(top_layers), shape.layers)


def plan(shape: ModelShape, quantization: str, weight_bytes: int, lora_r: int, lora_targets, max_length: int,
         per_device_batch_size: int, gradient_checkpointing: bool, eager_attention: bool, batch_tokens: int,
         captured_layers: int, gpu_memory_gb: float, scoring_length: int | None = None,
         lm_features: bool = False, top_layers: int | None = None) -> MemoryPlan:
    """The memory one device needs to fine-tune (at `per_device_batch_size` rows of `max_length` tokens) and to
    score (`batch_tokens` per batch of rows up to `scoring_length` tokens, embed.max_length; default max_length; with
    `lm_features`, the LM head's logits too), and the largest batch that fits `gpu_memory_gb`. With LoRA on the
    `top_layers` only, autograd keeps activations for those layers alone (nothing below them needs a gradient)."""
    per_weight = WEIGHT_BYTES.get(quantization, weight_bytes)
    weights = (shape.linear_params * per_weight + shape.other_params * weight_bytes) / GB
    trainable = lora_params(shape, lora_r, lora_targets, top_layers) + 3 * shape.hidden
    trained = trained_layer_count(shape, top_layers)
    lora = trainable * TRAINABLE_BYTES / GB
    layer_row = shape.activation_elements_per_token_layer(eager_attention, max_length) * max_length * \
        ACTIVATION_BYTES / GB
    full_row = layer_row * trained
    checkpointed_row = shape.hidden * max_length * ACTIVATION_BYTES * trained / GB + 2 * layer_row
    per_row = checkpointed_row if gradient_checkpointing else full_row
    # One layer's activations for a batch of `batch_tokens` tokens, and the captured layers' fp32 hidden states.
    scoring_length = scoring_length or max_length
    scoring_tokens = max(batch_tokens, scoring_length)  # a batch holds at least one row
    scoring = (scoring_tokens * shape.activation_elements_per_token_layer(eager_attention, scoring_length)
               * ACTIVATION_BYTES + captured_layers * scoring_tokens * shape.hidden * 4) / GB
    if lm_features:  # embed.lm_features: the fp32 LM head and one chunk's logits, log-probabilities and probabilities
        from pipeline.llm.inference import LM_CHUNK

        scoring += (shape.vocab * shape.hidden * 4 + 3 * LM_CHUNK * shape.vocab * 4) / GB

    def total(batch: int) -> float:
        return max(weights + lora + batch * per_row, weights + scoring) + CONTEXT_GB

    fitting = [b for b in range(1, 1025) if total(b) <= gpu_memory_gb]
    return MemoryPlan(weights, lora, per_device_batch_size * per_row, per_row, full_row, scoring, CONTEXT_GB,
                      total(per_device_batch_size), per_device_batch_size, float(gpu_memory_gb),
                      max(fitting, default=0), total(per_device_batch_size) <= gpu_memory_gb)
