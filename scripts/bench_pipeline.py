"""Wall time of `stage=all` by stage, before and after a change, on the same real rows in one run.

    python scripts/bench_pipeline.py                        # before = ef46c8d (the code before issue 11), after = HEAD
    python scripts/bench_pipeline.py --before REV --after REV --rows 240 --test-rows 80

Each side is checked out into its own git worktree (so edits in the working copy never leak into a timing) and
runs `python -m pipeline` (stage=all: check -> finetune -> embed -> stack, and predict where that side's stage=all
runs it) as a subprocess on a fixed, seeded sample of the shared human-labelled pairs, with the same overrides and
the same converted model cache. The sides run one after the other on the same machine; the table gives each
stage's seconds as recorded in the experiment's metrics.json (`all.stage_seconds`).

After the timings, `--averaging` (on by default) also scores the test rows with the averaged fold adapter
(`embed.test_adapters=averaged`: one pass instead of K) on the after side and compares it with the default
(every fold adapter, features averaged): argmax agreement, mean absolute probability difference, and the log loss
of both on the test rows' held-back labels.

Last line: before_s=X after_s=Y saved=Z% averaged_agreement=A
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "preference"
SOURCES = ("autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "prd_vicuna80_human.csv")
KAGGLE_COLUMNS = ["id", "prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"]
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
BASE_BEFORE = "ef46c8d"


def build_sample(folder: Path, rows: int, test_rows: int, seed: int) -> tuple[Path, Path, np.ndarray]:
    """(train csv, unlabelled test csv, the test rows' labels as class indices)."""
    data = pd.concat([pd.read_csv(SHARED / name, dtype=str, keep_default_na=False) for name in SOURCES],
                     ignore_index=True)[KAGGLE_COLUMNS]
    sample = data.sample(n=rows + test_rows, random_state=seed).reset_index(drop=True)
    train, test = sample.iloc[:rows], sample.iloc[rows:]
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test.drop(columns=LABELS).to_csv(folder / "test.csv", index=False)
    labels = test[LABELS].astype(int).to_numpy().argmax(axis=1)
    return folder / "train.csv", folder / "test.csv", labels


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def run_pipeline(code: Path, overrides: list[str], log: Path) -> float:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(code)}
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=code, env=env,
                                stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"error: the pipeline at {code} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def submission_probs(path: Path, ids: pd.Series) -> np.ndarray:
    frame = pd.read_csv(path, dtype={"id": str}).set_index("id").loc[ids.astype(str)]
    return frame[LABELS].to_numpy()


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(probs / probs.sum(axis=1, keepdims=True), 1e-15, 1)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BASE_BEFORE)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--test-rows", type=int, default=80)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_pipeline")
    parser.add_argument("--no-averaging", dest="averaging", action="store_false")
    parser.add_argument("--averaging-only", action="store_true",
                        help="skip the timings: compare the averaged adapter on the existing after-side experiment")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sides")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED} not found (the shared real data this bench runs on)")

    out = args.out.resolve()
    train, test, test_labels = build_sample(out / "data", args.rows, args.test_rows, args.seed)
    common = [f"data.train={train}", f"data.test={test}", "model=smollm2", "model.max_length=128", "cv.n_folds=3",
              "finetune.epochs=1", "finetune.swap_augmentation=false", *args.overrides]
    seconds: dict[str, dict[str, float]] = {}
    walls: dict[str, float] = {}
    sides = [] if args.averaging_only else [("before", args.before), ("after", args.after)]
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        for side, rev in sides:
            code = worktree(rev, Path(tmp) / side)
            try:
                walls[side] = run_pipeline(code, [*common, f"paths.output_dir={out / side}", "exp_name=bench"],
                                           out / f"{side}.log")
            finally:
                if side == "before" or not args.averaging:
                    subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, check=False)
            metrics = json.loads((out / side / "bench" / "metrics.json").read_text())
            seconds[side] = metrics["all"]["stage_seconds"]
            print(f"{side} ({rev}): {walls[side]:.0f} s", flush=True)

        total = {side: sum(seconds[side].values()) for side in seconds}
        if sides:
            stages = list(dict.fromkeys([*seconds["before"], *seconds["after"]]))
            print(f"\nstage=all on {args.rows} train + {args.test_rows} test rows (SmolLM2-135M, max_length 128, "
                  f"3 folds, 1 epoch), seconds by stage")
            print(f"| stage | before ({args.before}) | after ({args.after}) |\n|---|---|---|")
            for stage in stages:
                print(f"| {stage} | {seconds['before'].get(stage, '-')} | {seconds['after'].get(stage, '-')} |")
            print(f"| total | {total['before']:.1f} | {total['after']:.1f} |")

        agreement = float("nan")
        if args.averaging:
            code = Path(tmp) / "after"
            if not code.exists():
                worktree(args.after, code)
            exp = out / "after" / "bench"
            ids = pd.read_csv(test, dtype={"id": str})["id"]
            default = submission_probs(exp / "submission.csv", ids)
            start = time.perf_counter()
            run_pipeline(code, [*common, f"paths.output_dir={out / 'after'}", "exp_name=bench", "stage=predict",
                                "embed.test_adapters=averaged"], out / "averaged.log")
            averaged_seconds = time.perf_counter() - start
            averaged = submission_probs(exp / "submission.csv", ids)
            subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, check=False)
            agreement = float(np.mean(default.argmax(1) == averaged.argmax(1)))
            print(f"\ntest rows scored by every fold adapter (default) vs the averaged adapter "
                  f"(stage=predict embed.test_adapters=averaged, {averaged_seconds:.0f} s incl. start-up)")
            print("| test features | log loss on held-back labels | accuracy |\n|---|---|---|")
            for name, probs in (("every fold adapter, averaged features", default),
                                ("one averaged adapter", averaged)):
                print(f"| {name} | {logloss(test_labels, probs):.4f} | "
                      f"{np.mean(probs.argmax(1) == test_labels):.3f} |")
            print(f"argmax agreement {agreement:.3f}, mean |p_default - p_averaged| "
                  f"{np.abs(default - averaged).mean():.4f}")

    if sides:
        saved = 100 * (1 - total["after"] / total["before"])
        print(f"\nbefore_s={total['before']:.1f} after_s={total['after']:.1f} saved={saved:.1f}% "
              f"averaged_agreement={agreement:.3f}")
    else:
        print(f"\naveraged_agreement={agreement:.3f}")


if __name__ == "__main__":
    main()
