"""Quality benchmark on real human-labelled pairs: does stage two beat the fine-tuned head and cheap text features?

    python scripts/bench_quality.py                 # ~50 min on 2 CPU cores (SmolLM2-135M, 1,200 rows, 3 folds)
    python scripts/bench_quality.py --group-by source   # leave-one-source-out: each fold is one source
    python scripts/bench_quality.py --pretrain-rows 2000   # folds start warm from a one-time fit on other rows
    python scripts/bench_quality.py --experiment shared_frozen --exp-name bench_frozen   # the frozen-feature path
    python scripts/bench_quality.py --experiment shared_distill --exp-name bench_distill \
        --teacher outputs/bench_frozen/stack --reference bench_quality_prompt   # a student beside the hard-label run

Builds a fixed, seeded sample of 1,200 rows with ties from ../shared/data/preference (Auto-J, PandaLM, PRD; the
same rows every run), runs the real pipeline (check -> finetune -> embed -> stack, the defaults of
`experiment=shared_ties`) as subprocesses of this one, then re-scores stacker variants (ablations) on the same
features and folds, and with the folds' sources, the stacker trained on two sources and scored on the third.
Every number is out-of-fold and honest: rounds, hyper-parameters, blend weights and the choice among candidates
are made on prompt-grouped inner splits of each training set, never on the rows scored. A re-run reuses finished
stages (the fine-tune is the slow part), so ablations can be added in seconds; `minutes` is always the wall time of
the first full run of each stage, kept in the experiment folder.

Last line: margin=X.XXXX head_gain=Y.YYYY minutes=Z.Z loso_margin=W.WWWW, where margin = best baseline (prior,
length, head) minus the stacker's OOF log loss, head_gain = prior minus head, and loso_margin = text statistics minus
the stacker with each source held out in turn (pooled; printed with the ablations). Goals: margin >= 0.02,
head_gain >= 0.01, minutes <= 60, loso_margin >= 0.
With --teacher (a distilled student, finetune.teacher=PATH) it also prints the student beside the hard-label run on
the same sample (--reference, an experiment of this benchmark) and the teacher's minutes (its bench_timings.json),
and the last line adds teacher_minutes=T reference_head_gain=R stacker_vs_reference=S (the reference's stacker
minus the student's: > 0 means the student's features stack better).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "preference"
WITH_TIES = ("autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "prd_vicuna80_human.csv")
STAGES = ("check", "finetune", "embed", "stack")
# Stacker variants re-scored on the run's features: name -> overrides of the stack config.
ABLATIONS = {
    "default (selected blend of members)": [],
    "no selection (always the blend)": ["stack.select=false"],
    "blend: head + text": ["stack.blend_members=[head,text]"],
    "blend: head + text + all_lgbm": ["stack.blend_members=[head,text,all_lgbm]"],
    "blend: head + vectors": ["stack.blend_members=[head,vectors]"],
    "blend: head + summary": ["stack.blend_members=[head,summary]"],
    "vectors: last layer only (h100)": ["stack.vectors.layers=[h100]"],
    "vectors: middle layer only (h050)": ["stack.vectors.layers=[h050]"],
    "vectors: h075 only": ["stack.vectors.layers=[h075]"],
    "vectors: diff + verdict_diff": ["stack.vectors.kinds=[diff,verdict_diff]"],
    "vectors: fwd orientation only": ["stack.vectors.orientations=[fwd]"],
    "vectors: base model (adapter disabled)": ["stack.vectors.source=base"],
    "vectors: base model, fwd only": ["stack.vectors.source=base", "stack.vectors.orientations=[fwd]"],
    "vectors: PCA 8": ["stack.vectors.pca_components=8"],
    "vectors: PCA 32": ["stack.vectors.pca_components=32"],
    "members without all_lgbm (head, text, summary, vectors)": ["stack.blend_members=[head,text,summary,vectors]"],
    "one LightGBM on every group alone (old stacker, honest rounds)": ["stack.blend_members=[all_lgbm]"],
    "no symmetric augmentation": ["stack.symmetric=false"],
    # The LM's own view (embed.lm_features): span log-likelihoods and entropies.
    "blend + likelihood member": ["stack.blend_members=[head,text,summary,vectors,all_lgbm,likelihood]"],
    "blend without likelihood member": ["stack.blend_members=[head,text,summary,vectors,all_lgbm]"],
    "blend + linear member": ["stack.blend_members=[head,text,summary,vectors,all_lgbm,likelihood,linear]"],
    "blend: text + likelihood": ["stack.blend_members=[text,likelihood]"],
    "likelihood: base model": ["stack.vectors.source=base",
                               "stack.blend_members=[head,text,summary,vectors,all_lgbm,likelihood]"],
    # What the frozen-feature path (finetune.train=false) would stack: the base model's features, no head.
    "base-model features only, no head (frozen path's inputs)": [
        "stack.vectors.source=base", "stack.blend_members=[text,summary,vectors,likelihood]"],
}


def build_sample(out: Path, rows: int, seed: int) -> None:
    frames = [pd.read_csv(SHARED / name, dtype=str, keep_default_na=False) for name in WITH_TIES]
    data = pd.concat(frames, ignore_index=True)
    sample = data.sample(n=rows, random_state=seed).reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(out, index=False)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def ablation_table(overrides: list[str], chosen: str | None = None) -> str:
    """Stacker variants re-scored on the run's features and folds (a minute each), each as honest as the stage;
    `chosen`: a regular expression picking variants by name."""
    import re

    from pipeline import context

    from pipeline.stage_two import cv

    from pipeline.stage_two.spec import StackSpec
    from pipeline.errors import UserError

    lines = ["| stacker variant | OOF log loss | accuracy | chosen per fold | seconds |", "|---|---|---|---|---|"]
    for name, extra in ABLATIONS.items():
        if chosen and not re.search(chosen, name):
            continue
        start = time.perf_counter()
        try:
            cfg = compose([*overrides, *extra])
            spec = StackSpec.from_config(cfg.stack, cfg.seed)
            result = cv.score(context.open_run(cfg, "bench_quality"), spec, baselines=False).metrics()
        except UserError as exc:
            lines.append(f"| {name} | n/a ({exc}) | | | |")
            continue
        lines.append(f"| {name} | {result['oof_logloss']:.4f} | {result['accuracy']:.3f} | "
                     f"{', '.join(result['chosen'])} | {time.perf_counter() - start:.0f} |")
    return "\n".join(lines)


def source_holdout_table(overrides: list[str]) -> str:
    """Leave-one-source-out for stage two: train on two sources' rows, score the third (every model and choice
    made without it; inner splits grouped by source too, as with cv.group_by=source). The head and vectors are
    the prompt-grouped run's OOF features, so this measures how the stacker carries to a new source;
    --group-by source measures the fine-tune too."""
    from pipeline import context, feature_table
    from pipeline.stage_two import cv, design
    from pipeline.stage_two.spec import StackSpec

    ctx = context.open_run(compose(overrides), "bench_quality")
    cfg, frame = ctx.cfg, ctx.train.frame
    matrices = feature_table.oof_features(ctx, feature_table.finetune_fold_states(ctx)[0])
    sources = sorted(frame["source"].unique())
    source_fold = frame["source"].map({s: k for k, s in enumerate(sources)}).to_numpy()
    spec = StackSpec.from_config(cfg.stack, cfg.seed)
    data = cv.StackData(design.stacker_inputs(frame, matrices), frame["label"].to_numpy(), source_fold,
                              source_fold, spec.vectors.settings(matrices.vectors), group_by="source")
    result = cv.evaluate(data, spec).metrics()
    names = ["stacker", *result["baselines"]]
    losses = {"stacker": result["per_fold"], **result["baseline_per_fold"]}
    lines = ["| held-out source | rows | " + " | ".join(names) + " | chosen |", "|---" * (len(names) + 3) + "|"]
    for k, source in enumerate(sources):
        lines.append(f"| {source} | {int((source_fold == k).sum())} | " +
                     " | ".join(f"{losses[n][k]:.4f}" for n in names) + f" | {result['chosen'][k]} |")
    lines.append(f"| all (pooled OOF) | {len(frame)} | {result['oof_logloss']:.4f} | " +
                 " | ".join(f"{result['baselines'][n]:.4f}" for n in names[1:]) + " | |")
    # loso_margin: text statistics (the length baseline) minus the stacker, pooled over the held-out sources.
    return "\n".join(lines), result["baselines"]["length"] - result["oof_logloss"]


def run_stage(stage: str, overrides: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "pipeline", f"stage={stage}", *overrides], cwd=ROOT,
                                stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise SystemExit(f"stage={stage} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def pretrain(sample: Path, rows: int, seed: int, overrides: list[str]) -> Path:
    """The warm start: `rows` shared rows none of which shares a prompt with `sample` (checked by content, see
    make_shared_subset.py --exclude), fitted once with shared_ties' settings (stage=fit); reused while it exists."""
    name = f"bench_pretrain_{rows}_{seed}"
    data = ROOT / "outputs" / "data" / f"{name}.csv"
    if not data.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shared_subset.py"), "--out", str(data),
                        "--rows", str(rows), "--seed", str(seed), "--files", "all", "--exclude", str(sample)],
                       check=True)
    exp = ROOT / "outputs" / name
    exp.mkdir(parents=True, exist_ok=True)
    run_stage("fit", ["experiment=shared_pretrain", f"exp_name={name}", f"data.train={data}", *overrides],
              exp / "bench_quality.log")
    fit = json.loads((exp / "metrics.json").read_text())["fit"]
    print(f"pretrain (one-time, not in `minutes`): {fit['train_rows']} rows, {fit['train_seconds'] / 60:.1f} min "
          f"training -> {exp / 'fit' / 'adapter'}", flush=True)
    return exp / "fit" / "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-by", default="prompt", help="cv.group_by: prompt, or source (leave-one-source-out)")
    parser.add_argument("--exp-name", default=None)
    parser.add_argument("--experiment", default="shared_ties",
                        help="the experiment config the stages run (shared_frozen: the frozen-feature path)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--ablations", default=None, help="a regular expression: only the ablations it matches")
    parser.add_argument("--stack-only", action="store_true",
                        help="re-run only stage=stack on the finished experiment's features (seconds); `minutes` "
                             "keeps the recorded first full run of each stage")
    parser.add_argument("--pretrain-rows", type=int, default=0,
                        help="first fit a warm start (experiment=shared_pretrain, stage=fit) on this many shared rows "
                             "that share no prompt with the sample, and start every fold from it (one-time work, "
                             "timed apart from `minutes`); 0 = no warm start")
    parser.add_argument("--teacher", default=None,
                        help="distil from this teacher (finetune.teacher: outputs/NAME or outputs/NAME/stack of the "
                             "same sample, folds and --group-by)")
    parser.add_argument("--reference", default=None,
                        help="with --teacher: the hard-label experiment of this benchmark to compare with (default "
                             "bench_quality_<group-by>)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every stage")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} not found: this benchmark needs the shared preference data")
    exp_name = args.exp_name or f"bench_quality_{args.group_by}"
    data = ROOT / "outputs" / "data" / f"bench_quality_{args.rows}_{args.seed}.csv"
    if not data.exists():
        build_sample(data, args.rows, args.seed)
    warm_start = []
    if args.pretrain_rows:
        warm_start = [f"finetune.init_adapter={pretrain(data, args.pretrain_rows, args.seed, args.overrides)}"]
    taught = [f"finetune.teacher={Path(args.teacher).resolve()}", "finetune/loss=distill"] if args.teacher else []
    overrides = [f"experiment={args.experiment}", f"exp_name={exp_name}", f"data.train={data}",
                 f"cv.group_by={args.group_by}", *warm_start, *taught, *args.overrides]
    exp = ROOT / "outputs" / exp_name
    exp.mkdir(parents=True, exist_ok=True)
    timings_file = exp / "bench_timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    log = exp / "bench_quality.log"
    for stage in ("stack",) if args.stack_only else STAGES:
        seconds = run_stage(stage, overrides, log)
        # Keep the first full run's time; a re-run that only resumed finished work must not shrink it.
        timings[stage] = max(timings.get(stage, 0.0), seconds)
        timings_file.write_text(json.dumps(timings, indent=2))
        print(f"{stage}: {seconds:.0f} s", flush=True)

    metrics = json.loads((exp / "metrics.json").read_text())
    stack = metrics["stack"]
    print("\n" + (exp / "stack" / "report.md").read_text().split("\n## ")[0])
    loso_margin = None
    if not args.no_ablations:
        sys.path.insert(0, str(ROOT))
        print("\nAblations (stage two only, same features and folds):\n" + ablation_table(overrides, args.ablations))
        if args.group_by == "prompt":
            table, loso_margin = source_holdout_table(overrides)
            print("\nLeave one source out (stage two):\n" + table)
    head, prior = stack["baselines"]["head"], stack["baselines"]["prior"]
    best = min(stack["baselines"][k] for k in ("prior", "length", "head"))
    minutes = sum(timings[s] for s in STAGES) / 60
    print(f"stage seconds: {', '.join(f'{s} {timings[s]:.0f}' for s in STAGES)}")
    loso = f" loso_margin={loso_margin:.4f}" if loso_margin is not None else ""
    taught = teacher_comparison(args, metrics, minutes) if args.teacher else ""
    print(f"margin={best - stack['oof_logloss']:.4f} head_gain={prior - head:.4f} minutes={minutes:.1f}{loso}{taught}")


def run_summary(exp: Path) -> dict | None:
    """A finished run of this benchmark: its stacker, head, prior, best baseline and minutes (None if unfinished)."""
    metrics_file, timings_file = exp / "metrics.json", exp / "bench_timings.json"
    if not metrics_file.exists() or "stack" not in json.loads(metrics_file.read_text()):
        return None
    stack = json.loads(metrics_file.read_text())["stack"]
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    return {"stacker": stack["oof_logloss"], "head": stack["baselines"]["head"], "prior": stack["baselines"]["prior"],
            "best": min(stack["baselines"][k] for k in ("prior", "length", "head")),
            "minutes": sum(timings.get(s, 0.0) for s in STAGES) / 60}


def teacher_comparison(args: argparse.Namespace, metrics: dict, minutes: float) -> str:
    """The student beside the hard-label reference run and the teacher (printed), and the last line's additions."""
    teacher_exp = Path(args.teacher).resolve()
    teacher_exp = teacher_exp.parent if teacher_exp.name == "stack" else teacher_exp
    teacher = run_summary(teacher_exp)
    reference = run_summary(ROOT / "outputs" / (args.reference or f"bench_quality_{args.group_by}"))
    student = run_summary(ROOT / "outputs" / (args.exp_name or f"bench_quality_{args.group_by}"))
    rows = [("hard-label run (reference)", reference), ("teacher", teacher), ("distilled student", student)]
    print("\n| run | head | head gain over prior | stacker | margin over best baseline | minutes |\n"
          "|---|---|---|---|---|---|")
    for name, run in rows:
        if run is None:
            print(f"| {name} | (not run) | | | | |")
            continue
        print(f"| {name} | {run['head']:.4f} | {run['prior'] - run['head']:+.4f} | {run['stacker']:.4f} | "
              f"{run['best'] - run['stacker']:+.4f} | {run['minutes']:.1f} |")
    per_fold = metrics["finetune"].get("teacher_target_logloss")
    if per_fold:
        print(f"teacher targets' log loss on each fold's training rows: {', '.join(f'{v:.4f}' for v in per_fold)}")
    line = f" teacher_minutes={teacher['minutes']:.1f}" if teacher else ""
    if reference:
        line += (f" reference_head_gain={reference['prior'] - reference['head']:.4f} "
                 f"stacker_vs_reference={reference['stacker'] - student['stacker']:.4f}")
    return line


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
