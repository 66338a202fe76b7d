"""Write an HF folder holding a random-initialised classifier of a model preset's shape (`model.arch`), with a
borrowed tokenizer, so every stage can run on a GPU at the preset's real size without its weights:

    python scripts/make_random_model.py --model llama3_8b --out /tmp/llama3_8b_random [--tokenizer DIR]
    python -m pipeline model=llama3_8b model.path=/tmp/llama3_8b_random data.train=...

The weights are random, so the figures of such a run say how fast and how big, never how good.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarking as bench  # noqa: E402  (scripts/benchmarking.py, beside this file)


def main() -> None:
    parser = bench.common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the HF folder to write")
    args = parser.parse_args()
    cfg = bench.compose(args)
    _, tokenizer = bench.model_source_and_tokenizer(cfg, preset_random=True, tokenizer_dir=args.tokenizer)
    on = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = bench.random_classifier(cfg.model, tokenizer, torch.bfloat16, on)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: random {cfg.model.name}, {sum(p.numel() for p in model.parameters()):,} parameters (bf16)")


if __name__ == "__main__":
    main()
