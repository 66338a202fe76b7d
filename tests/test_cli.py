"""The command line: user mistakes give one `error:` line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args, f"paths.output_dir={tmp_path}",
                           f"paths.model_cache_dir={tmp_path / 'models'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize("content, fragments", [
    (None, ["missing.csv", "file not found"]),
    ("id,prompt,response_a\n1,a,b\n", ["missing required column response_b"]),
    ("id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n1,p,a,b,1,1,0\n",
     ["row id 1", "exactly one winner"]),
])
def test_bad_train_file(tmp_path, content, fragments):
    path = tmp_path / "missing.csv"
    if content is not None:
        path.write_text(content)
    result = run_cli("stage=check", "model=tiny", f"data.train={path}", tmp_path=tmp_path)
    assert_user_error(result, *fragments)


def test_unknown_stage(tmp_path):
    assert_user_error(run_cli("stage=train", "model=tiny", tmp_path=tmp_path), "stage=train is not one of")


def test_quantization_on_cpu_fails_early(tmp_path):
    assert_user_error(run_cli("stage=finetune", "model=tiny", "model.quantization=4bit", tmp_path=tmp_path),
                      "model.quantization=4bit needs a CUDA GPU")


def test_later_stage_before_earlier_one(tmp_path):
    assert_user_error(run_cli("stage=embed", "model=tiny", tmp_path=tmp_path), "run stage=finetune first")


def test_check_on_demo_data_writes_metrics(tmp_path):
    result = run_cli("stage=check", "model=tiny", "exp_name=c", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "check train: 160 rows" in result.stdout
    import json

    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["check"]["train"]["label_counts"].keys() == {"a", "b", "tie"}
    assert metrics["check"]["test"]["n_rows"] == 40
    assert metrics["check"]["train"]["token_lengths"]["pair"]["max"] > 0
    assert (tmp_path / "c" / "folds.parquet").exists()
