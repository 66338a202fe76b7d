"""The protocol for stage-two defaults: every candidate on several samples, adopted only if it hurts none.

    python scripts/bench_defaults.py bench_quality_prompt bench_frozen bench_frozen_hh   # finished experiments

Runs on finished experiments' features (no model pass: minutes). Each experiment gives several samples:
- `EXP/folds`: its own prompt-grouped folds;
- `EXP/loso`: each source held out in turn (inner splits grouped by source), when the rows have a `source` column;
- `EXP/seed=S`: prompt-grouped folds drawn with other seeds, only for frozen-path experiments (finetune.train=false,
  whose features come from the base model and so depend on no fold; a fine-tuned experiment's OOF features under
  other folds would carry the scored rows' labels).
Every candidate (stack overrides) is scored on every sample beside the reference (the first candidate); the table
gives each candidate's change in OOF log loss per sample (negative = better), and per sample the stacker's worst
fold against the class prior and its margin over its best input (prior, text statistics, head). The rule: a
candidate is adopted only if it hurts no sample by more than --tolerance (0.005) and helps on average.
Last line: adopted=NAME[,NAME] worst_fold_vs_prior=X min_margin=Y for the best adopted candidate (or the reference).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMBERS_WITH_CLIP = ("summary", "vectors", "likelihood", "linear")


def stage_two(pooling: str = "log_linear", robust: float = 0.0, calibrate: bool = False,
              fallback: float | None = None, clip: bool = False) -> list[str]:
    """Stack overrides (dotted keys under `stack.`) stating every stage-two setting, so a candidate means the same
    whatever defaults the experiment was recorded with."""
    return [f"pooling={pooling}", f"blend_robust={robust}", f"calibrate={str(calibrate).lower()}",
            f"fallback_margin={'null' if fallback is None else fallback}",
            *[f"members.{m}.clip={str(clip).lower()}" for m in MEMBERS_WITH_CLIP]]


EARLIER = "earlier stage two"
CLIPPED = "+ clip"
BASE_MEMBERS = "[head,text,summary,vectors,all_lgbm]"
# name -> (stack overrides, the candidate it is judged against: None = the reference, the first entry). The
# earlier stage two (before bounded pooling), then each new piece alone, together, and all of it; then the member
# sets shared_ties has used, judged on top of clipping (the piece that passes the rule).
CANDIDATES = {
    EARLIER: (stage_two(), None),
    CLIPPED: (stage_two(clip=True), None),
    "+ calibrate": (stage_two(calibrate=True), None),
    "+ clip + calibrate": (stage_two(calibrate=True, clip=True), None),
    "+ robust weights (log-linear)": (stage_two(robust=0.5), None),
    "linear pool": (stage_two(pooling="linear"), None),
    "linear pool + robust": (stage_two(pooling="linear", robust=0.5), None),
    "geometric pool + robust": (stage_two(pooling="geometric", robust=0.5), None),
    "+ fallback": (stage_two(fallback=0.02), None),
    "all of it (linear pool, robust, calibrate, fallback, clip)": (
        stage_two("linear", 0.5, True, 0.02, True), None),
    "+ clip, without the likelihood and linear members": (
        [*stage_two(clip=True), f"blend_members={BASE_MEMBERS}"], CLIPPED),
    "+ clip, without the linear member": (
        [*stage_two(clip=True), f"blend_members={BASE_MEMBERS[:-1]},likelihood]"], CLIPPED),
}


@dataclass
class Sample:
    name: str
    experiment: str
    fold_of: np.ndarray
    groups: np.ndarray
    group_by: str


def experiment_config(folder: Path):
    from pipeline import predictor

    return predictor.recorded_experiment_config(folder)


def samples_of(exp: Path, cfg, frame, labels, seeds: list[int]) -> list[Sample]:
    from pipeline import folds

    name = exp.name
    fold_of = folds.load_or_create(exp, frame, cfg.cv.n_folds, cfg.seed, cfg.cv.group_by)["fold"].to_numpy()
    groups = folds.group_keys(frame, cfg.cv.group_by)
    out = [Sample(f"{name}/folds", name, fold_of, groups, str(cfg.cv.group_by))]
    if "source" in frame and frame["source"].nunique() > 2:
        sources = sorted(frame["source"].unique())
        by_source = frame["source"].map({s: k for k, s in enumerate(sources)}).to_numpy()
        out.append(Sample(f"{name}/loso", name, by_source, by_source, "source"))
    if not cfg.finetune.train:
        for seed in seeds:
            out.append(Sample(f"{name}/seed={seed}", name, folds.assign_folds(labels, groups, int(cfg.cv.n_folds),
                                                                             seed), groups, str(cfg.cv.group_by)))
    return out


def score(cfg, overrides: list[str], matrices, frame, labels, sample: Sample) -> dict:
    from pipeline.stage_two import cv, design
    from pipeline.stage_two.spec import StackSpec

    stack = OmegaConf.merge(cfg.stack, OmegaConf.from_dotlist(overrides))
    spec = StackSpec.from_config(stack, cfg.seed)
    data = cv.StackData(design.stacker_inputs(frame, matrices), labels, sample.fold_of, sample.groups,
                              spec.vectors.settings(matrices.vectors), group_by=sample.group_by)
    metrics = cv.evaluate(data, spec).metrics()
    prior = metrics["baseline_per_fold"]["prior"]
    return {"loss": metrics["oof_logloss"],
            "worst_vs_prior": max(s - p for s, p in zip(metrics["per_fold"], prior)),
            "margin": min(metrics["baselines"][k] for k in ("prior", "length", "head")) - metrics["oof_logloss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="finished experiments under outputs/")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="extra fold seeds (frozen path only)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs", help="where the experiments are")
    parser.add_argument("--candidates", default=None, help="a regular expression: only the candidates it matches")
    args = parser.parse_args()
    import re

    from pipeline import context, feature_table
    from pipeline.errors import UserError

    np.seterr(all="ignore")
    names = [n for n in CANDIDATES if args.candidates is None or n == next(iter(CANDIDATES))
             or re.search(args.candidates, n)]
    results: dict[str, dict[str, dict]] = {n: {} for n in names}
    samples = []
    for exp in (args.output_dir / name for name in args.experiments):
        cfg = experiment_config(exp)
        with tempfile.TemporaryDirectory() as scratch:
            ctx = context.open_run(cfg, "bench_defaults", out_root=Path(scratch))
            matrices = feature_table.oof_features(ctx, feature_table.finetune_fold_states(ctx)[0])
        frame, labels = ctx.train.frame, ctx.labels
        for sample in samples_of(exp, cfg, frame, labels, args.seeds):
            samples.append(sample)
            for name in names:
                start = time.perf_counter()
                try:
                    results[name][sample.name] = score(cfg, CANDIDATES[name][0], matrices, frame, labels, sample)
                except UserError as exc:  # a candidate these features cannot feed (e.g. no LM likelihoods)
                    print(f"{sample.name} | {name}: n/a ({exc})", flush=True)
                    continue
                print(f"{sample.name} | {name}: {results[name][sample.name]['loss']:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    # Only candidates every sample could score (and whose yardstick could) are compared.
    names = [n for n in names if len(results[n]) == len(samples)]
    reference = names[0]
    cols = [s.name for s in samples]
    print("\nChange in OOF log loss against the candidate each is judged against (negative = better); the "
          "reference row gives its log loss")
    print("| candidate | against | " + " | ".join(cols) + " | mean change | worst change | verdict |")
    print("|---" * (len(cols) + 5) + "|")
    adopted = []
    for name in names:
        against = CANDIDATES[name][1] or reference
        if name == reference:
            print(f"| {name} | | " + " | ".join(f"{results[name][c]['loss']:.4f}" for c in cols) + " | | | reference |")
            continue
        if against not in results:
            continue
        changes = [results[name][c]["loss"] - results[against][c]["loss"] for c in cols]
        ok = max(changes) <= args.tolerance and np.mean(changes) < 0
        if ok:
            adopted.append(name)
        print(f"| {name} | {against} | " + " | ".join(f"{d:+.4f}" for d in changes) +
              f" | {np.mean(changes):+.4f} | {max(changes):+.4f} | {'ADOPT' if ok else 'reject'} |")
    print("\nPer sample: worst fold minus the class prior (<= 0: never worse than the prior) / margin over the best "
          "input (prior, text statistics, head)")
    print("| candidate | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[name][c]['worst_vs_prior']:+.4f} / "
                                         f"{results[name][c]['margin']:+.4f}" for c in cols) + " |")
    best = min(adopted, key=lambda n: np.mean([results[n][c]["loss"] for c in cols])) if adopted else reference
    print(f"adopted={','.join(adopted) or 'none'} best={best!r} "
          f"worst_fold_vs_prior={max(results[best][c]['worst_vs_prior'] for c in cols):.4f} "
          f"min_margin={min(results[best][c]['margin'] for c in cols):.4f}")


if __name__ == "__main__":
    main()
