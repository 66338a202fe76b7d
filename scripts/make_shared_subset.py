"""Build a development train file from ../shared/data/preference (never committed: outputs/ is git-ignored).

    python scripts/make_shared_subset.py --out outputs/data/shared_ties.csv --rows 1000

Takes a seeded sample from the files that have ties (Auto-J, PandaLM, PRD by default), in proportion to their
sizes, keeping the Kaggle train.csv layout; ids stay unique because every source prefixes its own.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "preference"
WITH_TIES = ("autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "prd_vicuna80_human.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", nargs="+", default=list(WITH_TIES))
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    frames = [pd.read_csv(args.shared / name, dtype=str, keep_default_na=False) for name in args.files]
    data = pd.concat(frames, ignore_index=True)
    sample = data.sample(n=min(args.rows, len(data)), random_state=args.seed).reset_index(drop=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(args.out, index=False)
    counts = sample[["winner_model_a", "winner_model_b", "winner_tie"]].astype(float).sum().astype(int).tolist()
    print(f"{args.out}: {len(sample)} rows from {', '.join(args.files)}; a/b/tie = {counts}")


if __name__ == "__main__":
    main()
