"""Build a development train file from ../shared/data/preference (never committed: outputs/ is git-ignored).

    python scripts/make_shared_subset.py --out outputs/data/shared_ties.csv --rows 1000
    # rows for a one-time warm-start fit (stage=fit), none sharing a prompt with the rows an experiment scores:
    python scripts/make_shared_subset.py --out outputs/data/shared_pretrain.csv --rows 3000 --files all \
        --exclude outputs/data/bench_quality_1200_0.csv

Takes a seeded sample from the files that have ties (Auto-J, PandaLM, PRD by default; `all` adds hh-rlhf), in
proportion to their sizes, keeping the Kaggle train.csv layout; ids stay unique because every source prefixes its
own. `--exclude FILE` first drops every row whose prompt (by content, all turns) is a prompt of FILE, so a start
fitted on the output has seen neither those pairs nor other answers to their prompts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "preference"
WITH_TIES = ("autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "prd_vicuna80_human.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", nargs="+", default=list(WITH_TIES))
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--exclude", type=Path, nargs="*", default=[],
                        help="train files whose prompts (and so their pairs) the output must not contain")
    args = parser.parse_args()
    files = sorted(p.name for p in args.shared.glob("*.csv")) if args.files == ["all"] else args.files
    frames = [pd.read_csv(args.shared / name, dtype=str, keep_default_na=False) for name in files]
    data = pd.concat(frames, ignore_index=True)
    if args.exclude:
        from pipeline.data import load_pairs, parse_frame

        tidy = parse_frame(data, source=", ".join(files), with_labels=True).frame
        prompts = {"\x1f".join(t) for path in args.exclude
                   for t in load_pairs(path, with_labels=True).frame["prompt"]}
        keep = ~tidy["prompt"].map(lambda turns: "\x1f".join(turns) in prompts).to_numpy()
        print(f"--exclude: {int((~keep).sum())} rows share a prompt with {', '.join(map(str, args.exclude))}; "
              f"{int(keep.sum())} left")
        data = data[keep].reset_index(drop=True)
    sample = data.sample(n=min(args.rows, len(data)), random_state=args.seed).reset_index(drop=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(args.out, index=False)
    counts = sample[["winner_model_a", "winner_model_b", "winner_tie"]].astype(float).sum().astype(int).tolist()
    print(f"{args.out}: {len(sample)} rows from {', '.join(files)}; a/b/tie = {counts}")


if __name__ == "__main__":
    main()
