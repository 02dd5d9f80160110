"""The speed benchmark runs end to end and reports what benchmarks/README.md says it does
(its figures are checked by reading them, not by timed tests)."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys

from conftest import REPO, cli_env

# Real processes (the CLI, accelerate launch, launch scripts): the slow tier.
pytestmark = pytest.mark.slow


def test_throughput_json_has_every_figure(data_dir):
    r = subprocess.run(
        [
            sys.executable, "benchmarks/throughput.py", "--data-dir", str(data_dir), "--epochs", "2",
            "--reference-epochs", "1", "--reference-batches", "20", "--json",
        ],
        cwd=REPO, env=cli_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout[-2000:]  # exactly one JSON object on stdout
    out = json.loads(lines[0])
    for key in ("trainer_s_per_epoch", "bare_loop_s_per_epoch", "reference_loader_s_per_epoch", "valid_s"):
        assert out[key] > 0, key
    assert out["trainer_over_bare"] == out["trainer_s_per_epoch"] / out["bare_loop_s_per_epoch"]
    assert out["reference_over_trainer"] == out["reference_loader_s_per_epoch"] / out["trainer_s_per_epoch"]
    assert out["trainer_steps_per_epoch"] == out["steps_per_epoch"] == 60000 // 128
    assert out["fused_adam"] is True and out["flush_denormal"] is True and out["reference_adam"] == "usual"
    assert out["other_cpu_cores"] >= 0
    assert out["torch"] and out["accelerate"] and out["device"]
    assert set(out["targets"]) == {"valid_fraction < 0.1", "trainer_over_bare <= 1.15", "reference_over_trainer >= 2"}
