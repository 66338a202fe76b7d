"""stage=all (the default): check -> finetune -> embed -> stack, resuming whatever is already done (each stage
skips its finished folds); with a test file, stack writes the submission."""
from __future__ import annotations

import time

from omegaconf import DictConfig

from pipeline import artifacts, dist, layout
from pipeline.stages import check, embed, finetune, stack


def run(cfg: DictConfig) -> dict:
    # With a test file, finetune scores it at each fold's end, embed averages it and stack writes the submission:
    # nothing is left for stage=predict (which serves new test files later).
    stages = [("check", check), ("finetune", finetune), ("embed", embed), ("stack", stack)]
    results: dict = {}
    seconds: dict[str, float] = {}
    for name, module in stages:
        if name == "stack" and not dist.is_main_process():
            break  # under torchrun, other ranks share the fine-tuning and the feature passes
        start = time.perf_counter()
        results[name] = module.run(cfg)
        seconds[name] = round(time.perf_counter() - start, 1)
    lay = layout.Layout.of(cfg)
    results["stage_seconds"] = seconds
    if dist.is_main_process():
        artifacts.update_metrics(lay.root, "all", {"stage_seconds": seconds})
        print(f"\ndone in {sum(seconds.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
        print(f"  report:     {lay.stack / layout.REPORT}")
        print(f"  metrics:    {lay.metrics}")
        if "submission" in results.get("stack", {}):
            print(f"  submission: {results['stack']['submission']}")
    return results
