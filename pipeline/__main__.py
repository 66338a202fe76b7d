"""`python -m pipeline [stage=...] [key=value ...]`: dispatch a stage, return the metric sweeps minimise."""
from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline import configs, context, dist, locks, tracking, validation
from pipeline.errors import UserError

STAGES = ("check", "finetune", "embed", "stack", "predict", "all", "export", "fit")
# The metric a sweep minimises, per stage: its path in the stage's returned metrics.
SWEEP_METRIC = {"finetune": ("oof_logloss",), "stack": ("oof_logloss",), "all": ("stack", "oof_logloss")}
log = logging.getLogger("pipeline")


def locked_folder(cfg: DictConfig) -> Path | None:
    """The folder whose lock a stage holds for its whole run (README "Concurrency"): the experiment for every stage
    that writes its shared artifacts; none for stage=finetune (it locks each fold it trains, so K fold jobs run
    side by side) and for a stack multirun job (it writes only its own job folder); stage=predict's own output
    folder when paths.predict_dir sends its results elsewhere."""
    if cfg.stage == "finetune" or (cfg.stage == "stack" and context.multirun_job_dir() is not None):
        return None
    if cfg.stage == "predict" and cfg.paths.predict_dir:
        return Path(cfg.paths.predict_dir)
    return Path(cfg.paths.exp_dir)


def run_stage(cfg: DictConfig) -> dict:
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    validation.validate(cfg)
    module = importlib.import_module(f"pipeline.stages.{cfg.stage}")
    folder = locked_folder(cfg)
    with locks.experiment(folder, cfg.stage) if folder is not None else contextlib.nullcontext():
        metrics = module.run(cfg)
    if dist.is_main_process():
        tracking.log_stage_metrics(cfg, cfg.stage, metrics)
    return metrics


def print_error(message: str) -> None:
    """One `error:` line at the start of a line of stderr: open progress bars are closed first, so the line is
    never glued to a bar's last frame (`grep '^error:'` finds it)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def os_error_message(exc: OSError) -> str | None:
    """A file-system refusal (read-only folder, no permission, disk full) as one line naming the path; None for
    other OS errors (bugs: their traceback is wanted)."""
    if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
        return None
    where = exc.filename or "a file"
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "write somewhere writable: paths.output_dir=... (stage=predict on a read-only experiment: paths.predict_dir=...)"
    return f"cannot write {where}: {exc.strerror}; {hint}"


@hydra.main(version_base="1.3", config_path=configs.config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_stage(cfg)
    except UserError as exc:
        print_error(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        # A second interrupt while unwinding (a pending signal, a library re-raising it at shutdown) would end the
        # process by SIGINT with a traceback: ignore further ones, and leave at once once the line is out. Every
        # artifact is written atomically, so nothing is lost by skipping the shutdown hooks.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print_error(f"interrupted: stage={cfg.stage} of {cfg.paths.exp_dir} stopped; finished folds and files are "
                    "kept, and re-running the same command resumes from them")
        sys.stdout.flush()
        os._exit(130)
    except OSError as exc:
        message = os_error_message(exc)
        if message is None:
            raise
        print_error(message)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    value = metrics
    for key in SWEEP_METRIC.get(cfg.stage, (None,)):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def check_overrides(argv: list[str]) -> None:
    """Compose the config the way @hydra.main will, so a mistyped key or option (`finetune.epoch=2`, `modell=x`,
    `model=tinyy`) is one `error:` line with Hydra's own suggestion and exit 2, not a multi-line report. Multirun
    sweeps and Hydra's own flags are left to Hydra."""
    if any(arg.startswith("-") or arg.startswith(("hydra", "+hydra")) for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=configs.config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split()).split(" Config search path:")[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    try:
        logs = Path(cfg.paths.exp_dir) / "logs"
    except OmegaConfBaseException:
        return  # an interpolation only the run itself can resolve: left to the stage's own checks
    if not writable(logs):
        # Hydra writes its job logs into the experiment before the pipeline runs: a read-only place must be one
        # line here, not Hydra's traceback. stage=predict with paths.predict_dir logs there instead.
        if cfg.stage == "predict" and cfg.paths.predict_dir:
            run_dir = Path(cfg.paths.predict_dir) / "logs" / "predict" / time.strftime("%Y-%m-%d_%H-%M-%S")
            sys.argv.append(f"hydra.run.dir='{run_dir}'")
            return
        print(f"error: cannot write {logs}: {nearest_existing(logs)} is read-only; write somewhere writable: "
              "paths.output_dir=... (stage=predict on a read-only experiment: paths.predict_dir=...)",
              file=sys.stderr)
        sys.exit(2)


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable(path: Path) -> bool:
    """Whether `path` can be made and written: its nearest existing folder is writable."""
    return os.access(nearest_existing(path), os.W_OK)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_overrides(sys.argv[1:])
    main()
