"""Training throughput of the pipeline's fine-tune setup against a naive one, on the same rows, in one run.

    python scripts/bench_finetune.py [--rows 64] [--model smollm2] [--max-length 256]
    python scripts/bench_finetune.py --model llama3_8b --preset-random --rows 256 --max-length 1024   # GPU

pipeline: compute dtype from model.precision=auto (bf16 where supported), length-grouped batches, dynamic padding.
naive:    fp32, rows in file order, every row padded to max_length.
Both: the same LoRA setup (on every layer: finetune.top_layers=null), HF Trainer, one epoch over the rows. tokens/s counts real (non-pad) tokens.
peak_fraction: 4*N FLOPs per real token (frozen base + LoRA; N = non-embedding parameters; no recomputation)
per second, over this machine's GEMM peak measured here in the pipeline's compute dtype; model_shape_fraction: the
same over the rate of one decoder layer's linears at the model's shapes (benchmarking.model_shape_rate), at the
tokens of one batch (--batch-rows x --max-length), measured in this run. The last two rows skip PEFT's input casts
(bf16 -> fp32 -> bf16 under autocast: the same numbers); the rows above keep them, as before. The pipeline row trains
with finetune.attn_implementation=auto (eager attention on a CPU up to 256 tokens), the rows above it with the
model's own attention (sdpa).
Last line: speedup=X.XX padding_waste=Y.YY peak_fraction=Z.ZZ model_shape_fraction=F.FF

    python scripts/bench_finetune.py --profile   # where a LoRA step's seconds go (torch profiler), then the bench
    python scripts/bench_finetune.py --top-layers 8 --epochs 3   # LoRA on the top 8 layers (finetune.top_layers),
        # uncached and with the frozen prefix cached, beside every layer; last line:
        # top_layers_ratio=X.XX cached_ratio=Y.YY cached_vs_uncached_loss=Z
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarking as bench  # noqa: E402  (scripts/benchmarking.py, beside this file)
from pipeline.llm import modeling  # noqa: E402
from pipeline.formatting import encode_frame  # noqa: E402
from pipeline.llm.training import (PaddingCollator, pipeline_trainer, training_arguments, training_rows,  # noqa: E402
                                   with_cached_prefix)


def profile_steps(cfg, source, tokenizer, rows, dtype, on, steps: int = 6) -> None:
    """Run `steps` pipeline training steps under the torch profiler; print the top ops by self time and the share
    of each kind of work (matmuls, casts, optimizer, elementwise, the rest: collation, autograd bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    cfg.finetune.max_steps = steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_once(cfg, source, tokenizer, rows, dtype, on, grouped=True, fixed_length=None)
    cfg.finetune.max_steps = -1
    events = prof.key_averages()
    attr = "self_device_time_total" if on.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=attr, row_limit=15))
    for kind, share in bench.op_shares(prof, on).items():
        print(f"{kind}: {100 * share:.1f}% of self time")


def train_once(cfg, source, tokenizer, rows, dtype, on, grouped: bool, fixed_length: int | None,
               tight_length_batches: bool = True, input_casts: bool = False) -> dict:
    from transformers import set_seed

    set_seed(cfg.seed)
    model = bench.classifier(cfg, source, tokenizer, dtype, on)
    n_params = bench.non_embedding_params(model)
    model = modeling.add_lora(model, cfg.model, cfg.finetune.lora, cfg.model.gradient_checkpointing,
                              cfg.finetune.top_layers)
    modeling.set_lora_input_casts(model, input_casts)  # add_lora turns them off; `input_casts`: as before
    collator = PaddingCollator(tokenizer.pad_token_id, multiple_of=fixed_length or 1)
    bench.synchronize(on)
    start = time.perf_counter()  # the prefix cache's one-time pass counts
    cache = None
    if cfg.finetune.cache_prefix:
        rows, cache = with_cached_prefix(cfg, model, rows, tokenizer.pad_token_id, on, dtype)
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(cfg, Path(out), cfg.seed, dtype, on)
        args.train_sampling_strategy = "group_by_length" if grouped else "sequential"
        args.save_strategy = "no"
        args.disable_tqdm = True
        trainer = pipeline_trainer(None, tight_length_batches, cache=cache)(model=model, args=args,
                                                                            train_dataset=rows, data_collator=collator)
        with modeling.attention_for_training(model, modeling.training_attention(
                cfg.finetune.attn_implementation, cfg.model, on)):
            result = trainer.train()
        bench.synchronize(on)
        seconds = time.perf_counter() - start
    real = trainer.real_tokens
    return {"seconds": seconds, "tokens_per_s": real / seconds, "waste": 1 - real / trainer.padded_tokens,
            "flops_per_s": 4 * n_params * real / seconds, "n_params": n_params, "config": model.config,
            "rows_per_s": len(rows) * float(cfg.finetune.epochs) / seconds, "loss": result.training_loss}


def top_layer_runs(cfg, source, tokenizer, rows, dtype, on, top: int, epochs: int) -> list[tuple[str, dict]]:
    """LoRA on every layer beside LoRA on the top `top` layers (finetune.top_layers), uncached and with the frozen
    layers' output cached (finetune.cache_prefix), each for `epochs` epochs over the same rows."""
    runs = []
    for name, top_layers, cached in (("every layer", None, False), (f"top {top} layers", top, False),
                                     (f"top {top} layers, cached prefix", top, True)):
        variant = cfg.copy()
        variant.finetune.epochs = epochs
        variant.finetune.top_layers = top_layers
        variant.finetune.cache_prefix = cached
        runs.append((name, train_once(variant, source, tokenizer, rows, dtype, on, grouped=True,
                                      fixed_length=None)))
    return runs


def main() -> None:
    parser = bench.common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="first profile a few pipeline training steps")
    parser.add_argument("--top-layers", type=int, default=0,
                        help="also LoRA on the top K layers only, uncached and with the cached prefix, beside every "
                             "layer (rows/s and the loss reached), for --epochs epochs")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    cfg = bench.compose(args, f"finetune.per_device_batch_size={args.batch_rows}", "finetune.swap_augmentation=false",
                        "finetune.epochs=1", "finetune.report_to=none")
    on = modeling.device()
    dtype = modeling.compute_dtype(cfg.model.precision, on)
    source, tokenizer = bench.model_source_and_tokenizer(cfg, args.preset_random, args.tokenizer)
    data = bench.bench_rows(args, cfg)
    encoded = encode_frame(tokenizer, data.frame, cfg.model)
    rows = training_rows(encoded, encoded, data.frame["label"].to_numpy(), np.arange(len(encoded)), False)
    print(f"{len(rows)} rows, {sum(len(e.input_ids) for e in encoded)} real tokens, max_length "
          f"{cfg.model.max_length}, model {cfg.model.name}{' (random init)' if args.preset_random else ''}, "
          f"device {on}, pipeline dtype {dtype}")
    if args.profile:
        profile_steps(cfg, source, tokenizer, rows, dtype, on)
    if args.top_layers:
        runs = top_layer_runs(cfg, source, tokenizer, rows, dtype, on, args.top_layers, args.epochs)
        bench.print_table([(name, f"{r['seconds']:.1f}", f"{r['rows_per_s']:.2f}", f"{r['loss']:.4f}")
                           for name, r in runs], ("LoRA on", "seconds", "train rows/s", "mean train loss"))
        today, top, cached = (r for _, r in runs)
        print(f"top_layers_ratio={top['rows_per_s'] / today['rows_per_s']:.2f} "
              f"cached_ratio={cached['rows_per_s'] / today['rows_per_s']:.2f} "
              f"cached_vs_uncached_loss={cached['loss'] - top['loss']:+.5f}")
        return

    naive = train_once(cfg, source, tokenizer, rows, torch.float32, on, grouped=False,
                       fixed_length=cfg.model.max_length)
    # Measured right before the timed pipeline run, in the same process and dtype: the denominator of
    # peak_fraction reflects the machine as the run sees it (shared machines drift).
    # What the pipeline ran before profiling: HF's length grouping and LoRA dropout 0.05 (dropout masks were 27% of
    # a CPU LoRA step's self time; HF grouping does not group a few hundred rows).
    own_attention = cfg.copy()  # the rows before finetune.attn_implementation=auto: the model's own attention
    own_attention.finetune.attn_implementation = None
    profiled = own_attention.copy()
    profiled.finetune.lora.lora_dropout = 0.05
    before = train_once(profiled, source, tokenizer, rows, dtype, on, grouped=True, fixed_length=None,
                        tight_length_batches=False, input_casts=True)
    casts = train_once(own_attention, source, tokenizer, rows, dtype, on, grouped=True, fixed_length=None,
                       input_casts=True)
    no_casts = train_once(own_attention, source, tokenizer, rows, dtype, on, grouped=True, fixed_length=None)
    batch_tokens = args.batch_rows * cfg.model.max_length
    peak = bench.gemm_peak(dtype, on)
    shape_rate = bench.model_shape_rate(casts["config"], batch_tokens, dtype, on)
    pipeline = train_once(cfg, source, tokenizer, rows, dtype, on, grouped=True, fixed_length=None)
    attention = modeling.training_attention(cfg.finetune.attn_implementation, cfg.model, on) or "(the model's own)"
    bench.print_table([
        ("naive (fp32, file order, pad to max_length)", f"{naive['seconds']:.1f}", f"{naive['tokens_per_s']:.0f}",
         f"{naive['waste']:.3f}", f"{naive['flops_per_s'] / 1e9:.1f}"),
        (f"before profiling ({str(dtype).split('.')[-1]}, HF length grouping, LoRA dropout 0.05)",
         f"{before['seconds']:.1f}", f"{before['tokens_per_s']:.0f}", f"{before['waste']:.3f}",
         f"{before['flops_per_s'] / 1e9:.1f}"),
        (f"  + sorted length batches, dropout {cfg.finetune.lora.lora_dropout}, PEFT input casts",
         f"{casts['seconds']:.1f}", f"{casts['tokens_per_s']:.0f}", f"{casts['waste']:.3f}",
         f"{casts['flops_per_s'] / 1e9:.1f}"),
        ("  + no PEFT input casts", f"{no_casts['seconds']:.1f}", f"{no_casts['tokens_per_s']:.0f}",
         f"{no_casts['waste']:.3f}", f"{no_casts['flops_per_s'] / 1e9:.1f}"),
        (f"  + training attention {attention} (finetune.attn_implementation=auto: pipeline)",
         f"{pipeline['seconds']:.1f}", f"{pipeline['tokens_per_s']:.0f}", f"{pipeline['waste']:.3f}",
         f"{pipeline['flops_per_s'] / 1e9:.1f}"),
    ], ("setup", "seconds", "real tokens/s", "padding waste", "model GFLOP/s"))
    print(f"square GEMM peak ({str(dtype).split('.')[-1]}): {peak / 1e9:.1f} GFLOP/s; model-shape linears at "
          f"{batch_tokens} tokens: {shape_rate / 1e9:.1f} GFLOP/s; N = {pipeline['n_params']:,}; AMX: "
          f"{bench.has_amx()}")
    print(f"profiling fix: {pipeline['tokens_per_s'] / before['tokens_per_s']:.2f}x tokens/s; input casts: "
          f"{no_casts['tokens_per_s'] / casts['tokens_per_s']:.2f}x; loss {casts['loss']:.5f} with, "
          f"{no_casts['loss']:.5f} without; training attention {attention}: "
          f"{pipeline['tokens_per_s'] / no_casts['tokens_per_s']:.2f}x, loss {pipeline['loss']:.5f}")
    print(f"speedup={pipeline['tokens_per_s'] / naive['tokens_per_s']:.2f} padding_waste={pipeline['waste']:.2f} "
          f"peak_fraction={pipeline['flops_per_s'] / peak:.2f} "
          f"model_shape_fraction={pipeline['flops_per_s'] / shape_rate:.2f}")


if __name__ == "__main__":
    main()
