"""Stage metrics reach the tracker the Trainer reports to (finetune.report_to)."""
from __future__ import annotations

import pytest

from pipeline import tracking
from pipeline.layout import Layout


def test_scalars_flatten_numbers_and_leave_text_out():
    values = tracking.scalars({"oof_logloss": 0.9, "chosen": ["blend"], "per_fold": [1.0, 0.5],
                               "baselines": {"head": 1.1, "note": "x"}, "_oof": [9], "ok": True}, "stack")
    assert values == {"stack/oof_logloss": 0.9, "stack/per_fold/0": 1.0, "stack/per_fold/1": 0.5,
                      "stack/baselines/head": 1.1}


def test_report_to_parsing(tiny_cfg):
    assert tracking.trackers(tiny_cfg()) == []
    assert tracking.trackers(tiny_cfg("finetune.report_to=tensorboard")) == ["tensorboard"]
    assert tracking.trackers(tiny_cfg("finetune.report_to=[tensorboard,mlflow]")) == ["tensorboard", "mlflow"]


def test_stack_metrics_land_in_tensorboard(tiny_experiment, tmp_path):
    """stage=stack with report_to=tensorboard: the event file holds the stack table's numbers."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, exp, metrics = tiny_experiment
    tracked = cfg.copy()
    tracked.finetune.report_to = "tensorboard"
    tracked.paths.exp_dir = str(tmp_path / "exp")  # events only: the experiment itself is not touched
    sent = tracking.log_stage_metrics(tracked, "stack", metrics["stack"])
    events = EventAccumulator(str(Layout(tmp_path / "exp").tracking("stack")))
    events.Reload()
    assert events.Scalars("stack/oof_logloss")[0].value == pytest.approx(metrics["stack"]["oof_logloss"])
    assert events.Scalars("stack/baselines/head")[0].value == pytest.approx(metrics["stack"]["baselines"]["head"])
    assert set(events.Tags()["scalars"]) == set(sent)
