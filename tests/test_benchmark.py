"""The benchmarks run end to end (their main(), in this process), print one JSON object with
what benchmarks/README.md says, and take the trainer's own flags. Their figures are checked
by reading them, not by timed tests: each smoke run here is a slice of MNIST for seconds.
The GPU script's dry run starts its steps as processes, as it does on the device."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

BENCHMARKS = REPO / "benchmarks"
# A slice of MNIST; --batch-size 64 is a train flag passed through to the trainer.
TINY = ["--limit-train-samples", "512", "--limit-eval-samples", "100", "--batch-size", "64"]


@pytest.fixture
def run_json(bench, capfd):
    """``run_json(SCRIPT, *ARGS)``: the script's main(ARGS + --json) in this process (a fresh
    interpreter would add seconds of imports): exit 0 and exactly one JSON object on stdout."""

    def run(script: str, *args: str) -> dict:
        capfd.readouterr()
        rc = bench(script.removesuffix(".py")).main([*args, "--json"])
        out, err = capfd.readouterr()
        assert rc == 0, err[-3000:]
        lines = out.strip().splitlines()
        assert len(lines) == 1, out[-2000:]
        return json.loads(lines[0])

    return run


@pytest.fixture
def bench(monkeypatch):
    """A benchmark script imported as a module, as it imports its sibling `common`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


@pytest.mark.slow
def test_throughput(data_dir, run_json):
    out = run_json("throughput.py", "--data-dir", str(data_dir), "--epochs", "2", *TINY, "--reference-epochs", "1",
                   "--reference-batches", "2")
    assert out["torch"] and out["accelerate"] and out["torchvision"] and out["device"] and out["date"]
    assert out["device_type"] == "cpu" and out["threads"] >= 1 and out["other_cpu_cores"] >= 0
    # The pass-through flag reached the trainer's config; the benchmark's defaults (train
    # flags before the user's) hold where the user gave none.
    assert out["batch_size"] == out["config"]["data"]["batch_size"] == 64 and out["train_args"][-2:] == ["--batch-size", "64"]
    assert out["model"] == "mlp" and out["learning_rate"] == 1e-3 and out["config"]["wandb_mode"] == "disabled"
    assert out["config"]["cpu"] is True and out["train_samples"] == 512
    assert out["mode"] == "throughput" and out["epochs"] == 2
    for key in ("trainer_s_per_epoch", "bare_loop_s_per_epoch", "reference_loader_s_per_epoch", "valid_s",
                "trainer_wall_s", "trainer_samples_per_s"):
        assert out[key] > 0, key
    assert len(out["trainer_epoch_train_s"]) == len(out["bare_loop_epoch_s"]) == 2
    assert out["trainer_over_bare"] == pytest.approx(out["trainer_s_per_epoch"] / out["bare_loop_s_per_epoch"])
    assert out["reference_over_trainer"] == pytest.approx(out["reference_loader_s_per_epoch"] / out["trainer_s_per_epoch"])
    assert out["valid_fraction"] == pytest.approx(out["valid_s"] / out["trainer_s_per_epoch"])
    # The bare loop and the reference see the same data and batch as the trainer.
    assert out["trainer_steps_per_epoch"] == out["steps_per_epoch"] == 512 // 64
    assert "first 2 batches" in out["reference_method"]
    assert out["fused_adam"] is True and out["flush_denormal"] is True and out["reference_adam"] == "usual"
    assert set(out["targets"]) == {"valid_fraction < 0.1", "trainer_over_bare <= 1.05", "reference_over_trainer >= 2"}


@pytest.mark.slow
def test_time_to_quality(data_dir, run_json):
    # A target any trained model reaches.
    out = run_json("time_to_quality.py", "--data-dir", str(data_dir), "--epochs", "2", *TINY, "--target", "1000")
    assert out["mode"] == "time_to_quality" and out["target_valid_loss"] == 1000 and out["batch_size"] == 64
    assert [p["epoch"] for p in out["curve"]] == [1, 2]
    assert out["reached"] is True and out["epoch"] == 1
    assert out["wall_s"] == pytest.approx(out["curve"][0]["epoch_seconds"]) and out["wall_s"] > 0
    assert out["curve"][1]["elapsed_s"] == pytest.approx(sum(p["epoch_seconds"] for p in out["curve"]))
    assert out["trainer_wall_s"] >= out["curve"][-1]["elapsed_s"]
    assert out["final_valid_loss"] == out["curve"][-1]["valid_loss"]


def test_time_to_quality_target_not_reached(bench):
    rows = [{"epoch": e, "valid/loss": 120.0 - e, "train/loss": 125.0, "epoch_seconds": 2.0} for e in (1, 2)]
    curve = bench("time_to_quality").curve
    assert curve(rows, 1.0) == {
        "reached": False, "epoch": None, "wall_s": None, "final_valid_loss": 118.0,
        "curve": [{"epoch": 1, "valid_loss": 119.0, "train_loss": 125.0, "epoch_seconds": 2.0, "elapsed_s": 2.0},
                  {"epoch": 2, "valid_loss": 118.0, "train_loss": 125.0, "epoch_seconds": 2.0, "elapsed_s": 4.0}],
    }
    assert curve(rows, 118.5)["epoch"] == 2 and curve(rows, 118.5)["wall_s"] == 4.0


def test_bad_train_flag_is_one_line_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench("throughput").main(["--batch-size", "0"])
    assert e.value.code == 2 and "data.batch_size" in capsys.readouterr().err.strip().splitlines()[-1]


def test_quality_lists_its_recipes(bench, capsys):
    assert bench("quality").main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "burda-iwae" in out and "--binarize dynamic" in out


@pytest.mark.slow
def test_quality_trains_a_recipe_and_scores_it_with_its_protocol(run_json):
    out = run_json("quality.py", "--recipe", "burda-iwae", "--iw-samples", "20", "--iw-images", "40", "--epochs", "1",
                   *TINY)
    # The recipe's flags reached the config; the pass-through ones came after them.
    assert out["config"]["model"]["kind"] == "burda" and out["config"]["loss"]["iw_samples"] == 5
    assert out["config"]["data"]["binarize"] == "dynamic" and out["epochs"] == len(out["curve"]) == 1
    assert out["test_elbo"] == pytest.approx(out["curve"][-1]["valid_loss"], rel=1e-6)  # as training logged it
    assert 0 < out["iw_nll"] < out["iw_images_elbo"]  # a tighter bound, on the same images
    assert out["protocol"]["test_images"] == 100 and "iw_samples" not in out["protocol"]
    assert out["iw_protocol"]["iw_samples"] == 20 and out["iw_protocol"]["test_images"] == 40
    assert "binarized" in out["protocol"]["data"]


@pytest.mark.slow
def test_canonical_example_reports_its_time_and_loss(run_json):
    out = run_json("canonical.py", "--epochs", "1", "--limit-train-samples", "1024")
    assert out["mode"] == "canonical" and out["epochs"] == len(out["curve"]) == 1
    assert out["wall_s"] == out["curve"][-1]["elapsed_s"] > 0
    # Nats per test image: an untrained model scores about 543 (784 pixels x log 2); 8 steps
    # of the example bring it to about 326.
    assert 0 < out["final_test_loss"] < 450


@pytest.mark.slow
def test_gpu_run_dry_run_fills_every_step(data_dir, tmp_path):
    # The device check's script, on the CPU with tiny sizes: every step runs and reports.
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_run.py"), "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                       env=cli_env(VAE_DIST_DATA_DIR=str(data_dir)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["setup", "nccl", "cuda_tests", "throughput_mlp", "throughput_deep_mlp",
                           "throughput_mlp_graphs", "canonical", "time_to_quality", "iw_nll"]
    assert all(s["status"].startswith("ok") and s["figures"] for s in steps.values()), {k: s.get("reason") for k, s in steps.items()}
    figures = {name: s["figures"] for name, s in steps.items()}
    assert figures["nccl"]["all_reduce_ok"] is True
    # test_cuda.py collects every test, all skipped without CUDA.
    assert figures["cuda_tests"]["counts"]["skipped"] == len(figures["cuda_tests"]["tests"]) > 0
    assert figures["throughput_mlp"]["model"] == "mlp" and figures["throughput_mlp"]["trainer_s_per_epoch"] > 0
    assert figures["throughput_deep_mlp"]["model"] == "deep-mlp" and figures["throughput_deep_mlp"]["batch_size"] == 64
    assert figures["canonical"]["wall_s"] > 0
    assert [p["epoch"] for p in figures["time_to_quality"]["curve"]] == [1, 2]
    assert figures["iw_nll"]["iw_nll"] > 0 and figures["iw_nll"]["protocol"]["data"].startswith("binarized")
    assert set(summary["targets"].values()) <= {True, False, None} and len(summary["targets"]) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cuda_tests.xml", "gpu_run.log", "summary.json",
                                                          "ttq_metrics.jsonl"]  # at most 8 files come back
