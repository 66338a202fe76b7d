"""Head logits + response_a / response_b vectors: the seed recipe against the pipeline's extraction, same rows.

    python scripts/bench_embed.py [--rows 64] [--model smollm2] [--max-length 256] [--batch-rows 8]
    python scripts/bench_embed.py --model llama3_8b --preset-random --rows 256 --max-length 1024   # GPU

seed recipe: fp32, rows in file order, every batch padded to max_length, output_hidden_states=True (every layer
kept), three passes per batch: the pair through the classifier for the head, then response_a alone and response_b
alone through the backbone (AutoModel) for their mean-pooled last hidden state.
pipeline:    one pass per pair (one orientation, as each embed pass is) in the compute dtype, rows sorted by
length, token-budget batches with dynamic padding, a forward hook keeping only the pooled layer.
memory_ratio: each recipe runs in its own process with --batch-rows rows per batch; its peak RSS above its RSS
after model load, seed over pipeline. peak_fraction: (2*N per real token + attention 4*T^2*d per layer) per
second over this machine's GEMM peak in the pipeline's compute dtype.
Last line: speedup=X.XX memory_ratio=Y.YY peak_fraction=Z.ZZ
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import benchmarking as bench  # noqa: E402
from pipeline import modeling  # noqa: E402
from pipeline.formatting import encode_frame, segment_text, tokenizer_fn  # noqa: E402
from pipeline.inference import forward_pass, pad_batch  # noqa: E402


@torch.inference_mode()
def seed_recipe(model, tokenizer, frame, encoded, max_length: int, batch_rows: int, on: torch.device) -> int:
    """The usual answer: three separate fp32 passes per batch, all hidden states kept, padded to max_length.
    Returns the number of real tokens processed."""
    tokenize = tokenizer_fn(tokenizer)
    backbone = model.get_base_model().model
    real = 0
    for start in range(0, len(encoded), batch_rows):
        index = range(start, min(start + batch_rows, len(encoded)))
        ids, mask, _ = pad_batch([encoded[i].input_ids for i in index], tokenizer.pad_token_id,
                                 multiple_of=max_length)
        model(input_ids=ids.to(on), attention_mask=mask.to(on), output_hidden_states=True)
        real += int(mask.sum())
        for column in ("response_a", "response_b"):
            texts = [segment_text(frame[column].iloc[i]) for i in index]
            rows = [t[:max_length] or [tokenizer.pad_token_id] for t in tokenize(texts)]
            ids, mask, _ = pad_batch(rows, tokenizer.pad_token_id, multiple_of=max_length)
            out = backbone(input_ids=ids.to(on), attention_mask=mask.to(on), output_hidden_states=True)
            last = out.hidden_states[-1]
            (last * mask.to(on).unsqueeze(-1)).sum(1) / mask.to(on).sum(1, keepdim=True)
            real += int(mask.sum())
    return real


def setup(args):
    cfg = bench.compose(args)
    on = modeling.device()
    source, tokenizer = bench.model_source_and_tokenizer(cfg, args.preset_random)
    data = bench.bench_rows(args, cfg)
    encoded = encode_frame(tokenizer, data.frame, cfg.model)
    return cfg, on, source, tokenizer, data.frame, encoded


def load(cfg, source, tokenizer, dtype, on):
    """The classifier with a (fresh) LoRA adapter, as an embed pass would load a fold's adapter."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model = bench.classifier(cfg, source, tokenizer, dtype, on)
    n_params = bench.non_embedding_params(model)
    model = modeling.add_lora(model, cfg.model, cfg.finetune.lora, False)
    model.eval()
    return model, n_params


def run_recipe(args, recipe: str, model, cfg, on, tokenizer, frame, encoded, dtype, batch_tokens: int,
               max_rows: int | None) -> float:
    start = time.perf_counter()
    if recipe == "seed":
        seed_recipe(model, tokenizer, frame, encoded, cfg.model.max_length, args.batch_rows, on)
    else:
        forward_pass(model, encoded, tokenizer.pad_token_id, batch_tokens, on, dtype, layers=list(cfg.embed.layers),
                     max_rows=max_rows)
    bench.synchronize(on)
    return time.perf_counter() - start


def memory_child(args, recipe: str) -> None:
    """Run one recipe in this process and print its peak RSS growth after model load (KiB) as JSON."""
    cfg, on, source, tokenizer, frame, encoded = setup(args)
    dtype = torch.float32 if recipe == "seed" else modeling.compute_dtype(cfg.model.precision, on)
    model, _ = load(cfg, source, tokenizer, dtype, on)
    after_load = bench.rss_kib()
    bench.reset_peak_rss()
    run_recipe(args, recipe, model, cfg, on, tokenizer, frame, encoded, dtype,
               batch_tokens=args.batch_rows * cfg.model.max_length, max_rows=args.batch_rows)
    gpu_peak = torch.cuda.max_memory_allocated() if on.type == "cuda" else None
    print(json.dumps({"after_load_kib": after_load, "peak_kib": bench.rss_kib("VmHWM"), "gpu_peak": gpu_peak}))


def main() -> None:
    parser = bench.common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--memory-child", choices=("seed", "pipeline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args, args.memory_child)
        return
    cfg, on, source, tokenizer, frame, encoded = setup(args)
    dtype = modeling.compute_dtype(cfg.model.precision, on)
    lengths = [len(e.input_ids) for e in encoded]
    print(f"{len(encoded)} rows, {sum(lengths)} real pair tokens, max_length {cfg.model.max_length}, model "
          f"{cfg.model.name}, device {on}, pipeline dtype {dtype}")

    seed_model, n_params = load(cfg, source, tokenizer, torch.float32, on)
    seed_s = run_recipe(args, "seed", seed_model, cfg, on, tokenizer, frame, encoded, torch.float32, 0, None)
    del seed_model
    model, _ = load(cfg, source, tokenizer, dtype, on)
    run_recipe(args, "pipeline", model, cfg, on, tokenizer, frame, encoded[:4], dtype, cfg.embed.batch_tokens, None)
    # Measured right before the timed pipeline pass, in the same process and dtype (shared machines drift).
    peak = bench.gemm_peak(dtype, on)
    pipe_s = run_recipe(args, "pipeline", model, cfg, on, tokenizer, frame, encoded, dtype, cfg.embed.batch_tokens,
                        None)
    backbone = model.get_base_model().config
    flops = 2 * n_params * sum(lengths) + bench.attention_flops(lengths, backbone.num_hidden_layers,
                                                               backbone.hidden_size)

    memory = {}
    for recipe in ("seed", "pipeline"):
        child = subprocess.run([sys.executable, __file__, "--memory-child", recipe, "--rows", str(args.rows),
                                "--model", args.model, "--max-length", str(args.max_length), "--batch-rows",
                                str(args.batch_rows), *(["--data", str(args.data)] if args.data else []),
                                *(["--preset-random"] if args.preset_random else []), *args.overrides],
                               capture_output=True, text=True, check=True)
        stats = json.loads(child.stdout.strip().splitlines()[-1])
        memory[recipe] = (stats["gpu_peak"] / 1024 if stats["gpu_peak"] is not None
                          else stats["peak_kib"] - stats["after_load_kib"])
    bench.print_table([
        ("seed recipe (fp32, 3 passes, all hidden states, pad to max_length)", f"{seed_s:.2f}",
         f"{len(encoded) / seed_s:.1f}", f"{memory['seed'] / 1024:.0f}"),
        (f"pipeline ({str(dtype).split('.')[-1]}, 1 pass, hook, sorted token batches)", f"{pipe_s:.2f}",
         f"{len(encoded) / pipe_s:.1f}", f"{memory['pipeline'] / 1024:.0f}"),
    ], ("recipe", "seconds", "rows/s", f"peak MiB above loaded ({args.batch_rows} rows/batch)"))
    print(f"GEMM peak ({str(dtype).split('.')[-1]}): {peak / 1e9:.1f} GFLOP/s; pipeline model "
          f"{flops / pipe_s / 1e9:.1f} GFLOP/s; N = {n_params:,}")
    print(f"speedup={seed_s / pipe_s:.2f} memory_ratio={memory['seed'] / max(memory['pipeline'], 1):.2f} "
          f"peak_fraction={flops / pipe_s / peak:.2f}")


if __name__ == "__main__":
    main()
