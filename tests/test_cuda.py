"""The CUDA paths, on a machine with a GPU (all skipped without one; benchmarks/gpu_run.py
runs this file on the lent GPU machine): every model trains in bf16 and compiled, a
resumed run ends with the uninterrupted run's weights, a CUDA-trained model serves every
command on a CPU-only machine, no host sync happens between two logging points, and CUDA
agrees with the CPU on the same config to float tolerance.

Determinism: the MLP models need no setting for a bit-exact resume (cuBLAS is
deterministic on one stream); the conv model's cuDNN kernels need
``torch.backends.cudnn.deterministic = True`` (set by the test that resumes it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, check_ok, cli_env, main_in_process, small_train_args

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODELS = ["deep-mlp", "mlp", "burda", "conv"]


def cuda_args(data_dir: Path, art: Path, *more: str) -> list[str]:
    """small_train_args on the GPU: 1024 images at batch 32 (32 steps per epoch)."""
    args = small_train_args(data_dir, art, "--batch-size", "32", *more)
    return [a for a in args if a != "--cpu"]


def train_ok(args: list[str], capsys) -> str:
    ran = main_in_process(args, capsys)
    check_ok(ran)
    return ran.stdout + ran.stderr


def weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(str(art / "model.safetensors"))


def finite_rows(art: Path) -> list[dict]:
    from vae_dist.run.folder import read_metrics

    rows = read_metrics(art)
    assert rows and all(torch.isfinite(torch.tensor([r["train/loss"], r["valid/loss"]])).all() for r in rows), rows
    return rows


@pytest.mark.parametrize("model,deterministic_cudnn", [("deep-mlp", False), ("conv", True)])
def test_resume_on_cuda_reaches_the_uninterrupted_weights(model, deterministic_cudnn, data_dir, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", deterministic_cudnn)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    # Two epochs of 32 steps, ended mid-epoch at step 50; dynamic binarization and the
    # cosine schedule, so the per-epoch coins and the rate are on the resumed path too.
    flags = ["--model", model, "--epochs", "2", "--binarize", "dynamic", "--lr-schedule", "cosine"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_ok(cuda_args(data_dir, whole, *flags, "--max-steps", "50"), capsys)
    train_ok(cuda_args(data_dir, parts, *flags, "--max-steps", "20", "--checkpoint-every-steps", "10"), capsys)
    train_ok(cuda_args(data_dir, parts, *flags, "--max-steps", "50", "--resume"), capsys)
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's in {differ}"


@pytest.fixture(scope="module")
def cuda_run(data_dir, tmp_path_factory) -> Path:
    """A finished float32 CUDA run (deep-mlp, dynamic binarization)."""
    from vae_dist.cli.app import main

    art = tmp_path_factory.mktemp("cuda") / "run"
    main(cuda_args(data_dir, art, "--binarize", "dynamic"))
    return art


def test_commands_serve_a_cuda_trained_model_on_a_cpu_only_machine(cuda_run, data_dir, tmp_path):
    # One fresh interpreter that sees no GPU runs every command on the CUDA run's folder.
    code = textwrap.dedent("""
        import sys, torch
        from vae_dist.cli.app import main
        assert not torch.cuda.is_available()
        run, data, out = sys.argv[1:4]
        for args in (["evaluate", run, "--json", "--iw-samples", "10", "--limit-eval-samples", "200", "--data-dir", data],
                     ["sample", run, "--num", "16", "--out", out + "/s.png"],
                     ["reconstruct", run, "--num", "8", "--data-dir", data, "--out", out + "/r.png"],
                     ["interpolate", run, "--from", "0", "--to", "1", "--data-dir", data, "--out", out + "/i.png"]):
            try:
                main(args)
                rc = 0
            except SystemExit as e:
                rc = e.code
            print("RC", args[0], rc, flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(cuda_run), str(data_dir), str(tmp_path)], cwd=REPO,
                       env=cli_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("RC ")]
    assert codes == [[c, "0"] for c in ("evaluate", "sample", "reconstruct", "interpolate")], r.stdout + r.stderr[-3000:]
    assert '"iw_nll"' in r.stdout
    assert all((tmp_path / f).stat().st_size > 0 for f in ("s.png", "r.png", "i.png"))


def test_commands_serve_a_cuda_trained_model_where_cuda_is_visible(cuda_run, data_dir, tmp_path, capsys):
    for args in (["evaluate", str(cuda_run), "--json", "--iw-samples", "10", "--limit-eval-samples", "200",
                  "--data-dir", str(data_dir)],
                 ["sample", str(cuda_run), "--num", "16", "--out", str(tmp_path / "s.png")]):
        check_ok(main_in_process(args, capsys))


def test_no_host_sync_between_logging_points(data_dir, tmp_path, capsys, monkeypatch):
    """torch's sync debug mode raises on any synchronizing CUDA call from the first step
    after the run's first logging point (the warm-up: handles, the allocator's first
    blocks) to the end: only the logging points and the epoch ends may sync."""
    from vae_dist.training import learner as learner_mod

    def syncs_allowed(fn):
        def wrapper(*a, **kw):
            torch.cuda.set_sync_debug_mode("default")
            try:
                return fn(*a, **kw)
            finally:
                if logged[0]:  # from the first logging point to the end of the loop
                    torch.cuda.set_sync_debug_mode("error")
        return wrapper

    logged, logs = [False], [0]
    real_log = learner_mod.Learner._log_train

    def log_train(self, progress):
        real_log(self, progress)
        logged[0], logs[0] = True, logs[0] + 1

    monkeypatch.setattr(learner_mod.Learner, "_log_train", syncs_allowed(log_train))
    monkeypatch.setattr(learner_mod.Learner, "_end_epoch", syncs_allowed(learner_mod.Learner._end_epoch))
    monkeypatch.setattr(learner_mod.Learner, "_start_epoch", syncs_allowed(learner_mod.Learner._start_epoch))
    real_fit = learner_mod.Learner.fit

    def fit(self, *a, **kw):  # the export after the loop copies the weights to the host
        try:
            return real_fit(self, *a, **kw)
        finally:
            logged[0] = False
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(learner_mod.Learner, "fit", fit)
    try:
        # The default recipe's cosine rate and KL warm-up, dynamic coins and the IW bound.
        out = train_ok(cuda_args(data_dir, tmp_path / "run", "--epochs", "2", "--binarize", "dynamic",
                                 "--iw-train-samples", "3", "--log-every-steps", "8"), capsys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logs[0] == 2 * 32 // 8, out[-2000:]  # 64 steps logged every 8: 7 intervals checked after the first


def test_cuda_agrees_with_cpu_after_a_few_steps(data_dir, tmp_path, capsys):
    # float32, matrix products without TF32 (torch's default), 6 steps of the canonical model.
    flags = ["--model", "mlp", "--max-steps", "6", "--learning-rate", "1e-3", "--lr-schedule", "constant"]
    init, gpu, cpu = tmp_path / "init", tmp_path / "gpu", tmp_path / "cpu"
    train_ok(cuda_args(data_dir, gpu, *flags), capsys)
    train_ok(small_train_args(data_dir, cpu, "--batch-size", "32", *flags), capsys)
    # The initial weights: one step of size 1e-30.
    train_ok(small_train_args(data_dir, init, "--batch-size", "32", "--model", "mlp", "--max-steps", "1",
                              "--learning-rate", "1e-30", "--lr-schedule", "constant"), capsys)
    a, b, w0 = weights(gpu), weights(cpu), weights(init)
    for k in a:
        moved = (b[k].double() - w0[k].double()).pow(2).mean().sqrt()
        diff = (a[k].double() - b[k].double()).pow(2).mean().sqrt()
        assert diff <= 1e-3 * moved + 1e-7, f"{k}: CUDA and CPU weights differ by RMS {diff:.3g} (training moved them {moved:.3g})"
    ga, gb = finite_rows(gpu)[-1], finite_rows(cpu)[-1]
    for key in ("train/loss", "valid/loss"):
        assert ga[key] == pytest.approx(gb[key], rel=1e-5), key


# Compiling takes the longest: these come last, so that a run cut short has the rest.
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", [["--mixed-precision", "bf16"], ["--compile"]], ids=["bf16", "compile"])
def test_each_model_trains_on_cuda(model, mode, data_dir, tmp_path, capsys):
    art = tmp_path / "run"
    out = train_ok(cuda_args(data_dir, art, "--model", model, *mode), capsys)
    assert "on cuda" in out, out[-2000:]
    finite_rows(art)
    saved = weights(art)
    assert saved and not any(k.startswith("_orig_mod.") for k in saved)  # the plain model's names
    config = json.loads((art / "config.json").read_text())
    assert config["mixed_precision"] == ("bf16" if "bf16" in mode else "no") and config["compile"] == ("--compile" in mode)
