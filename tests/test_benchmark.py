"""The benchmarks run end to end, print one JSON object with what benchmarks/README.md says,
and take the trainer's own flags (their figures are checked by reading them, not by timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

# Real processes (the benchmark scripts): the slow tier.
pytestmark = pytest.mark.slow

# A slice of MNIST so that each run takes seconds; --batch-size 64 is a train flag passed through.
TINY = ["--epochs", "2", "--limit-train-samples", "2048", "--limit-eval-samples", "500", "--batch-size", "64"]


def run_json(script: str, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--json"],
        cwd=REPO, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout[-2000:]  # exactly one JSON object on stdout
    return json.loads(lines[0])


def check_environment(out: dict) -> None:
    assert out["torch"] and out["accelerate"] and out["torchvision"] and out["device"] and out["date"]
    assert out["device_type"] == "cpu" and out["threads"] >= 1 and out["other_cpu_cores"] >= 0
    # The pass-through flag reached the trainer's config and the run's settings.
    assert out["batch_size"] == out["config"]["data"]["batch_size"] == 64
    assert out["train_args"][-2:] == ["--batch-size", "64"]
    # The benchmark's defaults (train flags before the user's) where the user gave none.
    assert out["model"] == "mlp" and out["learning_rate"] == 1e-3 and out["config"]["wandb_mode"] == "disabled"
    assert out["config"]["cpu"] is True and out["config"]["data"]["limit_train_samples"] == 2048


def test_throughput(data_dir):
    out = run_json(
        "throughput.py", "--data-dir", str(data_dir), *TINY, "--reference-epochs", "1", "--reference-batches", "5"
    )
    check_environment(out)
    assert out["mode"] == "throughput" and out["epochs"] == 2 and out["train_samples"] == 2048
    for key in ("trainer_s_per_epoch", "bare_loop_s_per_epoch", "reference_loader_s_per_epoch", "valid_s",
                "trainer_wall_s", "trainer_samples_per_s"):
        assert out[key] > 0, key
    assert len(out["trainer_epoch_train_s"]) == len(out["bare_loop_epoch_s"]) == 2
    assert out["trainer_over_bare"] == pytest.approx(out["trainer_s_per_epoch"] / out["bare_loop_s_per_epoch"])
    assert out["reference_over_trainer"] == pytest.approx(out["reference_loader_s_per_epoch"] / out["trainer_s_per_epoch"])
    assert out["valid_fraction"] == pytest.approx(out["valid_s"] / out["trainer_s_per_epoch"])
    # The bare loop and the reference see the same data and batch as the trainer: 2048 // 64 steps.
    assert out["trainer_steps_per_epoch"] == out["steps_per_epoch"] == 2048 // 64
    assert "first 5 batches" in out["reference_method"]
    assert out["fused_adam"] is True and out["flush_denormal"] is True and out["reference_adam"] == "usual"
    assert set(out["targets"]) == {"valid_fraction < 0.1", "trainer_over_bare <= 1.15", "reference_over_trainer >= 2"}


def test_time_to_quality(data_dir):
    # A target any trained model reaches, and one no model does.
    out = run_json("time_to_quality.py", "--data-dir", str(data_dir), *TINY, "--target", "1000")
    check_environment(out)
    assert out["mode"] == "time_to_quality" and out["target_valid_loss"] == 1000
    assert [p["epoch"] for p in out["curve"]] == [1, 2]
    assert out["reached"] is True and out["epoch"] == 1
    assert out["wall_s"] == pytest.approx(out["curve"][0]["epoch_seconds"]) and out["wall_s"] > 0
    assert out["curve"][1]["elapsed_s"] == pytest.approx(sum(p["epoch_seconds"] for p in out["curve"]))
    assert out["trainer_wall_s"] >= out["curve"][-1]["elapsed_s"]
    assert out["final_valid_loss"] == out["curve"][-1]["valid_loss"]


def test_time_to_quality_target_not_reached(data_dir):
    out = run_json("time_to_quality.py", "--data-dir", str(data_dir), *TINY, "--epochs", "1", "--target", "1")
    assert out["reached"] is False and out["epoch"] is None and out["wall_s"] is None
    assert len(out["curve"]) == 1 and out["epochs"] == 1


def test_bad_train_flag_is_one_line_usage_error():
    r = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--batch-size", "0"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "data.batch_size" in r.stderr.strip().splitlines()[-1]


def test_quality_trains_a_recipe_and_scores_it_with_its_protocol():
    out = run_json("quality.py", "--recipe", "burda-iwae", "--iw-samples", "20", *TINY)
    # The recipe's flags reached the config; the pass-through ones came after them.
    assert out["config"]["model"]["kind"] == "burda" and out["config"]["loss"]["iw_samples"] == 5
    assert out["config"]["data"]["binarize"] == "dynamic" and out["config"]["epochs"] == 2
    assert out["epochs"] == 2 and len(out["curve"]) == 2
    assert out["test_elbo"] == pytest.approx(out["curve"][-1]["valid_loss"], rel=1e-6)  # as training logged it
    assert 0 < out["iw_nll"] < out["test_elbo"]  # a tighter bound
    assert out["protocol"]["iw_samples"] == 20 and out["protocol"]["test_images"] == 500
    assert "binarized" in out["protocol"]["data"]


def test_quality_lists_its_recipes():
    r = subprocess.run([sys.executable, "benchmarks/quality.py", "--list"], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "default" in r.stdout and "--binarize dynamic" in r.stdout


def test_canonical_example_reports_its_time_and_loss():
    out = run_json("canonical.py", "--epochs", "1")
    assert out["mode"] == "canonical" and len(out["curve"]) == 1
    assert out["wall_s"] == out["curve"][-1]["elapsed_s"] > 0
    assert 100 < out["final_test_loss"] < 200  # one epoch of the example: about 128 nats
