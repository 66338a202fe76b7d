"""Head logits + response_a / response_b vectors: the seed recipe against the pipeline's extraction, same rows.

    python scripts/bench_embed.py [--rows 64] [--model smollm2] [--max-length 256] [--batch-rows 8] [--profile] [--compile]
    python scripts/bench_embed.py --model llama3_8b --preset-random --rows 256 --max-length 1024   # GPU

seed recipe: fp32, rows in file order, every batch padded to max_length, output_hidden_states=True (every layer
kept), three passes per batch: the pair through the classifier for the head, then response_a alone and response_b
alone through the backbone (AutoModel) for their mean-pooled last hidden state.
pipeline:    one pass per pair (one orientation, as each embed pass is) in the compute dtype, rows sorted by
length, token-budget batches with dynamic padding, a forward hook keeping only the pooled layer, the fold's LoRA
merged into the base weights (embed.merge_lora). Beside it, the same pass as it ran before: LoRA unmerged (base +
two skinny matmuls per linear), first with PEFT's input casts (bf16 -> fp32, undone by autocast), then without,
then with batches closed before 10% padding (inference.length_batches) instead of filling the token budget.
memory_ratio: each recipe runs in its own process with --batch-rows rows per batch; its peak RSS above its RSS
after model load, seed over pipeline (the pipeline's includes the copy of the base weights a merge keeps).
peak_fraction: (2*N per real token + attention 4*T^2*d per layer) per second over this machine's square-GEMM peak
in the pipeline's compute dtype; model_shape_fraction: the same over the rate of one decoder layer's linears at
the model's own shapes (benchmarking.model_shape_rate), both measured in this run.
--profile: the share of self time per kind of work (matmuls, attention, casts, elementwise, the rest) of the pass
before and after, under torch.profiler. --compile: also the merged pass with the decoder compiled (torch.compile,
dynamic shapes), its one-time compile seconds and after how many rows it is repaid (measured only; the pipeline
runs eager).
Last line: speedup=X.XX memory_ratio=Y.YY peak_fraction=Z.ZZ model_shape_fraction=F.FF merge_speedup=M.MM
batching_speedup=B.BB (batches closed before 10% padding against batches that fill the token budget, both unmerged)
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

import benchmarking as bench  # noqa: E402  (scripts/benchmarking.py, beside this file)
from pipeline.llm import modeling  # noqa: E402
from pipeline.llm.adapters import merged_lora  # noqa: E402
from pipeline.formatting import encode_frame, segment_text, tokenizer_fn  # noqa: E402
from pipeline.llm.inference import forward_pass, length_batches, pad_batch, padding_share  # noqa: E402


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
    source, tokenizer = bench.model_source_and_tokenizer(cfg, args.preset_random, args.tokenizer)
    data = bench.bench_rows(args, cfg)
    encoded = encode_frame(tokenizer, data.frame, cfg.model)
    return cfg, on, source, tokenizer, data.frame, encoded


def load(cfg, source, tokenizer, dtype, on):
    """The classifier with a (fresh) LoRA adapter, as an embed pass would load a fold's adapter."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model = bench.classifier(cfg, source, tokenizer, dtype, on)
    n_params = bench.non_embedding_params(model)
    model = modeling.add_lora(model, cfg.model, cfg.finetune.lora, False, cfg.finetune.top_layers)
    model.eval()
    return model, n_params


# The pipeline's pass as it was before each speed lever, then as it is: (merge the LoRA, skip PEFT's input casts,
# close batches early at embed.max_batch_padding instead of filling the token budget).
PASSES = {"before": (False, False, False), "no_casts": (False, True, False), "batches": (False, True, True),
          "pipeline": (True, True, True)}


def run_recipe(args, recipe: str, model, cfg, on, tokenizer, frame, encoded, dtype, batch_tokens: int,
               max_rows: int | None) -> float:
    start = time.perf_counter()
    if recipe == "seed":
        seed_recipe(model, tokenizer, frame, encoded, cfg.model.max_length, args.batch_rows, on)
    else:
        merge, skip_casts, close_early = PASSES[recipe]
        max_padding = cfg.embed.max_batch_padding if close_early else None
        modeling.set_lora_input_casts(model, not skip_casts)
        with merged_lora(model, enabled=merge):
            forward_pass(model, encoded, tokenizer.pad_token_id, batch_tokens, on, dtype,
                         layers=list(cfg.embed.layers), max_rows=max_rows, max_padding=max_padding)
    bench.synchronize(on)
    return time.perf_counter() - start


def profile_passes(args, model, cfg, on, tokenizer, frame, encoded, dtype) -> None:
    """Where a pass's self time goes, before the speed levers and now (a quarter of the rows each)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on.type == "cuda" else [])
    shares = {}
    for recipe in ("before", "pipeline"):
        with profile(activities=activities) as prof:
            run_recipe(args, recipe, model, cfg, on, tokenizer, frame, encoded[: max(4, len(encoded) // 4)],
                       dtype, cfg.embed.batch_tokens, None)
        shares[recipe] = bench.op_shares(prof, on)
    bench.print_table([(kind, f"{100 * shares['before'][kind]:.1f}%", f"{100 * shares['pipeline'][kind]:.1f}%")
                       for kind in shares["before"]], ("share of a pass's self time", "before", "pipeline"))


def compiled_pass(args, model, cfg, on, tokenizer, frame, encoded, dtype) -> dict:
    """The merged pass with the decoder body compiled (inductor, dynamic shapes): its one-time compile seconds
    (the first batches) and the seconds of a timed pass after it. Measured here only: the pipeline runs eager."""
    model.get_base_model().model.compile(dynamic=True)
    compile_s = run_recipe(args, "pipeline", model, cfg, on, tokenizer, frame, encoded[:4], dtype,
                           cfg.embed.batch_tokens, None)
    return {"compile_s": compile_s, "seconds": run_recipe(args, "pipeline", model, cfg, on, tokenizer, frame, encoded,
                                                          dtype, cfg.embed.batch_tokens, None)}


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
    parser.add_argument("--profile", action="store_true", help="first profile the pass before and after the levers")
    parser.add_argument("--compile", action="store_true",
                        help="also time the merged pass with the decoder compiled (torch.compile), and its compile cost")
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
    if args.profile:
        profile_passes(args, model, cfg, on, tokenizer, frame, encoded, dtype)
    for recipe in PASSES:  # warm-up
        run_recipe(args, recipe, model, cfg, on, tokenizer, frame, encoded[:4], dtype, cfg.embed.batch_tokens, None)
    # Both denominators measured right before the timed passes, in the same process and dtype (shared machines
    # drift); the model-shape rate at the token count of a full batch.
    backbone = model.get_base_model().config
    peak = bench.gemm_peak(dtype, on)
    shape_rate = bench.model_shape_rate(backbone, min(int(cfg.embed.batch_tokens), sum(lengths)), dtype, on)
    seconds = {recipe: run_recipe(args, recipe, model, cfg, on, tokenizer, frame, encoded, dtype,
                                  cfg.embed.batch_tokens, None) for recipe in PASSES}
    pipe_s = seconds["pipeline"]
    close_at = cfg.embed.max_batch_padding
    waste = {max_padding: padding_share(lengths, length_batches(lengths, int(cfg.embed.batch_tokens),
                                                                max_padding=max_padding))
             for max_padding in (None, close_at)}
    compiled = compiled_pass(args, model, cfg, on, tokenizer, frame, encoded, dtype) if args.compile else None
    flops = 2 * n_params * sum(lengths) + bench.attention_flops(lengths, backbone.num_hidden_layers,
                                                               backbone.hidden_size)

    memory = {}
    for recipe in ("seed", "pipeline"):
        child = subprocess.run([sys.executable, __file__, "--memory-child", recipe, "--rows", str(args.rows),
                                "--model", args.model, "--max-length", str(args.max_length), "--batch-rows",
                                str(args.batch_rows), *(["--data", str(args.data)] if args.data else []),
                                *(["--preset-random"] if args.preset_random else []),
                                *(["--tokenizer", str(args.tokenizer)] if args.tokenizer else []), *args.overrides],
                               capture_output=True, text=True, check=True)
        stats = json.loads(child.stdout.strip().splitlines()[-1])
        memory[recipe] = (stats["gpu_peak"] / 1024 if stats["gpu_peak"] is not None
                          else stats["peak_kib"] - stats["after_load_kib"])
    name = str(dtype).split('.')[-1]
    rows = [("seed recipe (fp32, 3 passes, all hidden states, pad to max_length)", seed_s, memory["seed"]),
            (f"before: {name}, 1 pass, hook, sorted token batches, LoRA unmerged, PEFT input casts",
             seconds["before"], None),
            ("  + no PEFT input casts", seconds["no_casts"], None),
            (f"  + batches closed before {close_at} padding (embed.max_batch_padding; padding {waste[None]:.2f} -> "
             f"{waste[close_at]:.2f})", seconds["batches"], None),
            ("  + LoRA merged into the base weights (pipeline)", pipe_s, memory["pipeline"])]
    if compiled is not None:
        rows.append((f"  + torch.compile of the decoder, dynamic shapes (compile: {compiled['compile_s']:.0f} s, "
                     "not counted)", compiled["seconds"], None))
    bench.print_table([(label, f"{s:.2f}", f"{len(encoded) / s:.1f}",
                        "" if label.startswith("seed") else f"{flops / s / 1e9:.0f}",
                        "" if mem is None else f"{mem / 1024:.0f}") for label, s, mem in rows],
                      ("recipe", "seconds", "rows/s", "model GFLOP/s", f"peak MiB above loaded ({args.batch_rows} "
                                                                        "rows/batch)"))
    print(f"square GEMM peak ({name}): {peak / 1e9:.1f} GFLOP/s; model-shape linears at "
          f"{min(int(cfg.embed.batch_tokens), sum(lengths))} tokens: {shape_rate / 1e9:.1f} GFLOP/s; pipeline "
          f"{flops / pipe_s / 1e9:.1f} GFLOP/s; N = {n_params:,}; AMX: {bench.has_amx()}")
    if compiled is not None:
        saved_per_row = (pipe_s - compiled["seconds"]) / len(encoded)
        print(f"compile: {pipe_s / compiled['seconds']:.2f}x the merged pass, model_shape_fraction "
              f"{flops / compiled['seconds'] / shape_rate:.2f}; repaid after "
              f"{compiled['compile_s'] / saved_per_row:.0f} rows like these" if saved_per_row > 0 else
              "compile: no faster than the merged pass")
    print(f"speedup={seed_s / pipe_s:.2f} memory_ratio={memory['seed'] / max(memory['pipeline'], 1):.2f} "
          f"peak_fraction={flops / pipe_s / peak:.2f} model_shape_fraction={flops / pipe_s / shape_rate:.2f} "
          f"merge_speedup={seconds['before'] / pipe_s:.2f} "
          f"batching_speedup={seconds['no_casts'] / seconds['batches']:.2f}")


if __name__ == "__main__":
    main()
