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


def test_a_read_only_output_dir_is_one_error_line(tmp_path):
    """Hydra makes its job folder inside the experiment before the pipeline runs: under a read-only
    paths.output_dir that is one `error:` line, not Hydra's OSError traceback. (Tests run as root, whom chmod does
    not stop: os.access, which also reports a read-only mount, is what is patched.)"""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    code = ("import os, runpy, sys; real = os.access; "
            f"os.access = lambda p, m, **k: False if str(p).startswith({str(read_only)!r}) else real(p, m, **k); "
            "sys.argv = ['pipeline', *sys.argv[1:]]; runpy.run_module('pipeline', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "stage=check", "model=tiny", f"paths.output_dir={read_only}",
                             f"paths.model_cache_dir={tmp_path / 'models'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_user_error(result, "cannot write", "is read-only", "paths.output_dir=")
    assert not any(read_only.iterdir())


def test_a_regular_install_ships_its_configs(tmp_path):
    """`pip wheel .` (what README's Kaggle flow builds) holds the Hydra configs: the command line runs from the
    installed package alone, away from the checkout."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    import zipfile

    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
        wheel.extractall(site)
    assert (site / "pipeline" / "conf" / "config.yaml").is_file()
    assert (site / "pipeline" / "conf" / "experiment" / "shared_ties.yaml").is_file()
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.stdout.strip().startswith(str(site)), probe.stdout + probe.stderr
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage=check", "model=tiny",
                             f"paths.output_dir={tmp_path / 'out'}", f"paths.model_cache_dir={tmp_path / 'models'}"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "default" / "metrics.json").is_file()
