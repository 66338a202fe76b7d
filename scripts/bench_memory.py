"""The GPU memory plan of stage=check (pipeline/memory.py) against the memory a real fine-tune step used, side by
side in one run, on this machine's CPU (no GPU needed): peak resident memory grown by a few Trainer steps of the
pipeline's own fold training (the base weights loaded, LoRA + head with AdamW, the activations of one batch)
versus the plan's weights + LoRA/optimizer + activations at the same batch, length and precision.

    python scripts/bench_memory.py                      # SmolLM2-135M, batch 8 x 256 tokens
    python scripts/bench_memory.py --model tiny --batch 4 --max-length 128

Last line: estimate_gb=X measured_gb=Y ratio=Y/X (activations on the CPU are bf16 under autocast as on a GPU; the
CUDA context allowance is left out, there is none on a CPU).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024 ** 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from pipeline import context, embed_passes
    from pipeline.llm import modeling
    from pipeline.stages import check, finetune

    out = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={args.model}", f"model.max_length={args.max_length}", "model.precision=bf16",
            f"finetune.per_device_batch_size={args.batch}", f"finetune.max_steps={args.steps}",
            "finetune.swap_augmentation=false", f"paths.output_dir={out}", "data.demo.n_train=160"])
    plan = check.memory_plan(cfg)
    ctx = context.open_run(cfg, "bench_memory")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    rows_all = embed_passes.encode_rows(tokenizer, ctx.train.frame, cfg)
    # Rows padded to max_length (long demo rows repeated) so every batch is as long as the plan assumes.
    longest = max(rows_all.encoded, key=lambda e: len(e.input_ids))
    rows = [{"input_ids": (longest.input_ids * 8)[: args.max_length], "labels": int(label)}
            for label in ctx.labels[: args.batch * args.steps]]
    before = peak_rss_gb()
    finetune.train_fold(ctx, 0, source, tokenizer, rows)
    measured = peak_rss_gb() - before
    estimate = plan.weights_gb + plan.lora_gb + plan.activations_gb
    print(plan.table())
    print(f"\n{args.model}: {args.batch} rows x {args.max_length} tokens, bf16, gradient checkpointing "
          f"{bool(cfg.model.gradient_checkpointing)}; peak memory grown by training: {measured:.3f} GB; plan "
          f"(weights {plan.weights_gb:.3f} + LoRA/AdamW {plan.lora_gb:.3f} + activations {plan.activations_gb:.3f})"
          f": {estimate:.3f} GB")
    print(f"estimate_gb={estimate:.3f} measured_gb={measured:.3f} ratio={measured / estimate:.2f}")


if __name__ == "__main__":
    main()
