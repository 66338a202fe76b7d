"""Helpers shared by scripts/bench_*.py: rows, models (real or random-initialised from a preset), GEMM peak,
FLOP counting and peak-RSS measurement."""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import configs, modeling
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


def model_source_and_tokenizer(cfg: DictConfig, preset_random: bool):
    """(source or None, tokenizer). A random preset borrows SmolLM2's tokenizer: its ids fit any preset's vocab."""
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
