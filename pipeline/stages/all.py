"""stage=all (the default): check -> finetune -> embed -> stack (-> predict with a test file), resuming whatever
is already done (each stage skips its finished folds)."""
from __future__ import annotations

import time

from omegaconf import DictConfig

from pipeline import artifacts, inputs
from pipeline.stages import check, embed, finetune, predict, stack


def run(cfg: DictConfig) -> dict:
    stages = [("check", check), ("finetune", finetune), ("embed", embed), ("stack", stack)]
    if inputs.data_paths(cfg)[1] is not None:
        stages.append(("predict", predict))
    results: dict = {}
    seconds: dict[str, float] = {}
    for name, module in stages:
        if name in ("embed", "stack", "predict") and not artifacts.is_main_process():
            break  # under torchrun, other ranks only share the fine-tuning work
        start = time.perf_counter()
        results[name] = module.run(cfg)
        seconds[name] = round(time.perf_counter() - start, 1)
    exp = artifacts.exp_dir(cfg)
    if artifacts.is_main_process():
        artifacts.update_metrics(exp, "all", {"stage_seconds": seconds})
        print(f"\ndone in {sum(seconds.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
        print(f"  report:     {exp / 'stack' / 'report.md'}")
        print(f"  metrics:    {exp / artifacts.METRICS_FILE}")
        if "predict" in results:
            print(f"  submission: {results['predict']['submission']}")
    return results
