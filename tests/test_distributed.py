"""Several processes: the same result at any process count, one writer, no rank left hanging.

The main run is two machines of one gloo rank each on loopback (two `accelerate launch`,
static rendezvous, no GPU and no --cpu): there both ranks are the main process of their
machine, so only a global-main check keeps the second from writing. It uses the literature's
recipe (dynamic binarization, the 3-sample bound, a cosine schedule), W&B offline and
checkpoints every 3 steps. It is compared with the same run in this process at 1 x the
global batch, and scored by `evaluate` at 1 and 2 processes. Then ranks started by hand (no torchrun to
end the other): one killed mid-run, and the resume; and an error only the main process sees.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (REPO, check_ok, cli_env, free_port, main_in_process, one_error_line, one_thread, output,
                      run_ranks, small_train_args)

# 640 images, 2 epochs: 10 global steps of 64 per epoch, 20 in all, across an epoch
# boundary (a new permutation, noise table and binarization draw). 501 test images at an
# eval batch of 48 shard into uneven rounds: at 2 ranks 5 x 96 + 21.
TRAIN_SAMPLES, EPOCHS, STEPS, GLOBAL_BATCH = 640, 2, 20, 64
EVAL_SAMPLES, EVAL_BATCH = 501, 48
RECIPE = ("--model", "burda", "--binarize", "dynamic", "--iw-train-samples", "3", "--lr-schedule", "cosine",
          "--warmup-epochs", "0.5")
EVERY, KEEP = 3, 2  # checkpoints: every 3 steps and at each epoch end; the newest 2 kept
# Runs at different process counts sum each gradient in another order, so they agree only
# to float rounding, which training can amplify where a ReLU input sits within rounding of
# zero (a flip). A sharding or noise-keying bug moves nearly every weight instead, so the
# root-mean-square difference over all weights separates the two (benchmarks/README.md has
# the measured spread); the negative control below shows it can fail.
WEIGHT_RMS_TOL = 1e-4
# 10x the default rate: 20 Adam steps then move weights far beyond the tolerance.
LR = "1e-3"
IW_SAMPLES = "30"


def train_args(data_dir: Path, art: Path, batch: int, *more: str, cpu: bool = True) -> list[str]:
    return [
        "train", *(["--cpu"] if cpu else []), "--data-dir", str(data_dir), "--artifact-dir", str(art),
        "--limit-train-samples", str(TRAIN_SAMPLES), "--limit-eval-samples", str(EVAL_SAMPLES),
        "--eval-batch-size", str(EVAL_BATCH), "--num-workers", "0", "--epochs", str(EPOCHS),
        "--learning-rate", LR, "--batch-size", str(batch), *RECIPE, "--checkpoint-every-steps", str(EVERY),
        "--keep-checkpoints", str(KEEP), *more,
    ]


def weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(str(art / "model.safetensors"))


def rms_diff(a: Path, b: Path) -> float:
    """Root-mean-square of the elementwise difference over every weight of the two models."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    d = torch.cat([(wa[k].double() - wb[k].double()).flatten() for k in wa])
    return d.pow(2).mean().sqrt().item()


def metrics(art: Path) -> list[dict]:
    return [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines() if line.strip()]


def models_under(root: Path) -> list[Path]:
    """Final models anywhere under root (checkpoint copies excluded)."""
    return [p for p in root.rglob("model.safetensors") if "checkpoints" not in p.relative_to(root).parts]


# ------------------------------------------------------------------ the shared runs

# Run by each rank instead of `-m vae_dist`: the CLI, then the names of the threads left.
# No automatic garbage collection: what only a reference cycle keeps alive then stays, as
# it may until the interpreter's teardown in a real run, instead of by the collector's luck.
LIST_THREADS = """\
import gc, glob, os, sys
gc.disable()
from vae_dist.cli.app import main
main(sys.argv[2:])
names = sorted(open(p).read().strip() for p in glob.glob('/proc/self/task/*/comm'))
open(os.path.join(sys.argv[1], 'rank-' + os.environ['RANK']), 'w').write(' '.join(names))
"""


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, data_dir) -> dict:
    """2 machines x 1 process x batch 32 on loopback, W&B offline, no GPU visible and no --cpu."""
    tmp = tmp_path_factory.mktemp("two")
    art, wandb_dir, threads = tmp / "art", tmp / "wandb-dir", tmp / "threads"
    wandb_dir.mkdir()
    threads.mkdir()
    script = tmp / "train_then_list_threads.py"
    script.write_text(LIST_THREADS)
    args = train_args(data_dir, art, GLOBAL_BATCH // 2, "--wandb-mode", "offline", cpu=False)
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), CUDA_VISIBLE_DEVICES="")
    port, procs, logs = free_port(), [], []
    for machine in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(threads), *args,
        ]
        logs.append(open(tmp / f"machine{machine}.log", "w"))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.monotonic() + 240
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
    out = [Path(f.name).read_text() for f in logs]
    assert codes == [0, 0], f"exit codes {codes}\n--- machine 0\n{out[0][-3000:]}\n--- machine 1\n{out[1][-3000:]}"
    return {"tmp": tmp, "art": art, "logs": out, "wandb_dir": wandb_dir, "threads": threads}


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_two_ranks_make_the_one_process_run_with_one_writer(two_machines, data_dir, tmp_path, capsys):
    art, (out0, out1) = two_machines["art"], two_machines["logs"]
    # A launch that found no GPU, without --cpu: one run of two CPU ranks, not two runs.
    assert "no GPU found: running the 2 processes as CPU (gloo) ranks" in out0 and "2 process(es) on cpu" in out0
    # One writer: one model, one W&B run (where WANDB_DIR says), each checkpoint announced
    # once by the global main, every EVERY steps and at each epoch end, the newest KEEP kept.
    assert models_under(two_machines["tmp"]) == [art / "model.safetensors"]
    assert len(list(two_machines["wandb_dir"].rglob("offline-run-*"))) == 1 and not (art / "wandb").exists()
    per_epoch = STEPS // EPOCHS
    expected = sorted(set(range(EVERY, STEPS + 1, EVERY)) | set(range(per_epoch, STEPS + 1, per_epoch)))
    assert [int(s) for s in re.findall(r"checkpoint \S*step-(\d{9}) written", out0)] == expected, out0[-3000:]
    assert "checkpoint" not in out1 and "epoch 1" not in out1, out1[-3000:]
    folders = sorted((art / "checkpoints").iterdir())
    assert [p.name for p in folders] == [f"step-{s:09d}" for s in expected[-KEEP:]]
    for c in folders:
        assert json.loads((c / "MANIFEST.json").read_text())["global_step"] == int(c.name[5:])
        assert sorted(p.name for p in c.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    pngs = sorted(p.name for p in (art / "images").iterdir())
    assert pngs == [f"epoch-{e:03d}-{k}.png" for e in range(1, EPOCHS + 1) for k in ("reconstructions", "samples")]

    # A gloo process group still alive at interpreter teardown joins its threads there, and
    # that can abort a finished rank ("terminate called without an active exception", exit
    # -6): by the time the CLI returns, no gloo thread is left.
    if Path("/proc/self/task").is_dir():
        threads = {p.name: p.read_text() for p in two_machines["threads"].iterdir()}
        assert sorted(threads) == ["rank-0", "rank-1"], threads
        assert all(names and "gloo" not in names for names in threads.values()), threads

    # The same weights and log as 1 process at the same global batch (1 x 64).
    from vae_dist.cli.app import main

    one = tmp_path / "one"
    with one_thread():
        main(train_args(data_dir, one, GLOBAL_BATCH, "--wandb-mode", "disabled"))
    d = rms_diff(one, art)
    print(f"\n1 x 64 vs 2 machines x 32 after {STEPS} steps: weight difference RMS {d:.3e}")
    assert d < WEIGHT_RMS_TOL, f"1 x 64 and 2 x 32 differ by RMS {d:.3e} (tolerance {WEIGHT_RMS_TOL})"
    rows = metrics(art)
    assert [(r["epoch"], r["step"], r["train/samples"], r["valid/samples"]) for r in rows] == [
        (e, e * per_epoch, TRAIN_SAMPLES, EVAL_SAMPLES) for e in range(1, EPOCHS + 1)
    ]
    for r1, r2 in zip(metrics(one), rows, strict=True):  # sums over the same samples; the rate a function of the step
        assert r1["step"] == r2["step"] and r1["train/lr"] == r2["train/lr"]
        for key in ("train/loss", "valid/loss", "valid/recon", "valid/kl"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5), key
    # Negative control: the same seed (initial weights, data order, noise, coins) but another
    # global batch (1 x 32): only how samples group into steps differs, which is exactly what a
    # sharding or noise-keying bug would change.
    with one_thread():
        main(train_args(data_dir, tmp_path / "batch32", GLOBAL_BATCH // 2, "--wandb-mode", "disabled"))
    d_batch = rms_diff(one, tmp_path / "batch32")
    assert d_batch > 10 * WEIGHT_RMS_TOL, f"another global batch differs by only RMS {d_batch:.3e}"

    # evaluate at 1 process and at 2 ranks (501 images: uneven shards) scores as training's
    # last validation did.
    evaluate = ["evaluate", str(art), "--iw-samples", IW_SAMPLES, "--json"]
    with one_thread():
        ran = main_in_process(evaluate, capsys)
    rank0, rank1 = run_ranks(evaluate)
    for r in (ran, rank0, rank1):
        check_ok(r)
    assert not json_lines(rank1.stdout)  # rank 0 alone prints the result
    (results_1,), (results_2,) = json_lines(ran.stdout), json_lines(rank0.stdout)
    logged = rows[-1]
    for procs, result in ((1, results_1), (2, results_2)):
        assert result["processes"] == procs and result["samples"] == EVAL_SAMPLES
        assert result["protocol"] == {**logged["protocol"], "iw_samples": int(IW_SAMPLES)}
        for key in ("loss", "recon", "kl"):
            assert result[key] == pytest.approx(logged[f"valid/{key}"], rel=1e-6), key
    # Each image's importance samples are keyed by its index and summed in index order;
    # only the matrix products' rounding depends on which images share a batch.
    assert results_2["iw_nll"] == pytest.approx(results_1["iw_nll"], rel=1e-9)
    assert results_1["iw_nll"] < results_1["loss"]  # a tighter bound than the ELBO


# ------------------------------------------------------------------ no rank left hanging


def test_the_other_ranks_raise_the_main_process_error_as_one_line():
    from vae_dist.training.distributed import as_seen_by_the_others
    from vae_dist.errors import ArtifactError, MainProcessError

    user = as_seen_by_the_others(ArtifactError("artifact directory x is refused"))
    assert type(user) is ArtifactError and str(user) == "artifact directory x is refused"
    other = as_seen_by_the_others(OSError(28, "No space left on device"))
    assert type(other) is MainProcessError
    assert str(other) == "the main process failed (OSError: [Errno 28] No space left on device)"
    assert str(as_seen_by_the_others(RuntimeError("first\nsecond"))) == "the main process failed (RuntimeError: first)"
    assert str(as_seen_by_the_others(KeyboardInterrupt())) == "the main process failed (KeyboardInterrupt)"


@pytest.mark.slow
def test_an_error_only_the_main_process_sees_reaches_every_rank(tmp_path, data_dir):
    """The artifact folder is checked by the main process alone; its refusal is raised on
    rank 1 too (the same one line, exit 2), so neither waits for the other, and the folder
    is left as it was."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "notes.txt").write_text("mine")
    lines = [one_error_line(rank) for rank in run_ranks(train_args(data_dir, art, GLOBAL_BATCH // 2))]
    assert lines[0] == lines[1] and "is not empty and was not created by vae_dist" in lines[0], lines
    assert [p.name for p in art.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_killed_rank_ends_its_peer_in_one_line_and_the_run_resumes_to_the_same_weights(two_machines, data_dir,
                                                                                          tmp_path):
    """Rank 1 is SIGKILLed before step 18: rank 0's next collective fails in gloo, and it used
    to exit with gloo's traceback. The newest checkpoint is step 15, mid-way through epoch 2;
    two ranks resume from it and end with the uninterrupted two-rank run's weights and log."""
    art = tmp_path / "run"
    args = train_args(data_dir, art, GLOBAL_BATCH // 2)
    survivor, killed = run_ranks(args, timeout=120, VAE_DIST_TEST_FAIL_AT="1:17:kill")
    assert killed.returncode == -signal.SIGKILL
    line = one_error_line(survivor)
    assert "another process of this run stopped or cannot be reached" in line and "--resume" in line, line
    assert not (art / "model.safetensors").exists()
    assert sorted(p.name for p in (art / "checkpoints").iterdir()) == ["step-000000012", "step-000000015"]
    resumed = run_ranks([*args, "--resume"], timeout=120)
    for rank in resumed:
        check_ok(rank)
    assert re.findall(r"resumed from (\S+): epoch (\d+), batch (\d+)/\d+, step (\d+)", output(resumed[0])) == [
        ("step-000000015", "2", "5", "15")], output(resumed[0])[-3000:]
    whole = two_machines["art"]
    a, b = weights(art), weights(whole)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    for row, want in zip(metrics(art), metrics(whole), strict=True):
        assert row["step"] == want["step"] and row["train/samples"] == TRAIN_SAMPLES  # no step re-taken or skipped
        for key in ("train/loss", "valid/loss"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=0), (row["epoch"], key)


# ------------------------------------------------------------------ the launcher's environment


def launcher_env(argv: list[str], multi: bool) -> dict[str, str]:
    """The ACCELERATE_* variables that `accelerate launch ARGV` gives its processes, by Accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "train.py"]))
    env = prepare_multi_gpu_env(args) if multi else prepare_simple_launcher_cmd_env(args)[1]
    return {name: value for name, value in env.items() if name.startswith("ACCELERATE_")}


@pytest.mark.parametrize("argv, multi", [
    (["--config_file", "launch/accelerate_cpu.yaml"], False),
    (["--config_file", "launch/accelerate_cpu.yaml", "--multi_gpu", "--main_process_port", "0"], True),
    (["--config_file", "accelerate_config.yaml", "--main_process_port", "0"], True),
    (["--multi_gpu", "--num_processes", "2", "--mixed_precision", "bf16", "--main_process_port", "0"], True),
    (["--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", "--debug",
      "--enable_cpu_affinity", "--cpu"], False),
], ids=["cpu-yaml", "cpu-yaml-multi", "gpu-yaml", "multi-gpu", "one-process-flags"])
def test_what_accelerate_launch_sets_for_the_repos_launch_configs_is_followed(argv, multi, monkeypatch, tmp_path):
    from vae_dist.training.distributed import launch_env

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no default config of this machine's user
    env = launcher_env(argv, multi)
    assert "ACCELERATE_MIXED_PRECISION" in env and "ACCELERATE_DYNAMO_BACKEND" in env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_env() == (0, 1)


@pytest.mark.parametrize("name, value", [
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4"),  # other weights, with config.json a plain run's
    ("ACCELERATE_USE_DEEPSPEED", "true"),  # a traceback without deepspeed
    ("ACCELERATE_USE_FSDP", "true"),
    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR"),  # compiled without --compile
    ("ACCELERATE_SETTING_OF_A_LATER_VERSION", "1"),
])
def test_an_accelerate_setting_vae_dist_does_not_implement_is_one_line_and_creates_nothing(
    name, value, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(name, value)
    art = tmp_path / "run"
    line = one_error_line(main_in_process(small_train_args(data_dir, art), capsys))
    assert line.startswith(f"error: {name}={value}: ") and "unset it" in line, line
    assert not art.exists()


@pytest.fixture
def fresh_process_state():
    """Accelerate keeps one process state per process, made by the first Accelerator: a fresh one, before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_wait_for_the_other_processes_is_said_and_bounded_like_any_collective(
    data_dir, tmp_path, capsys, monkeypatch, fresh_process_state
):
    from vae_dist.training.distributed import COLLECTIVE_TIMEOUT

    bounds = []

    def no_peer(*args, **kwargs):  # torch's rendezvous, which no other process joins
        bounds.append(kwargs.get("timeout"))
        raise torch.distributed.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_peer)
    port = str(free_port())
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port).items():
        monkeypatch.setenv(name, value)
    art = tmp_path / "run"
    ran = main_in_process(small_train_args(data_dir, art), capsys)
    line = one_error_line(ran)
    assert bounds == [COLLECTIVE_TIMEOUT]  # gloo's own is 30 minutes
    assert f"waiting for the 2 processes of this run to meet at 127.0.0.1:{port}" in ran.stderr, ran.stderr
    assert f"127.0.0.1:{port}" in line and "1/2 clients joined" in line, line
    assert not art.exists()


def test_a_stray_rank_in_a_one_process_command_is_ignored_and_an_impossible_one_refused(
    data_dir, tmp_path, capsys, monkeypatch
):
    """RANK counts only with WORLD_SIZE > 1, as for Accelerate: a stray RANK=1 made evaluate print nothing, and a
    stopped one-process training end without its line."""
    from test_pictures import model_run
    from vae_dist.training import trainer

    run = model_run(tmp_path, data_dir=data_dir)
    evaluate = ["evaluate", str(run), "--limit-eval-samples", "20", "--json"]
    monkeypatch.setenv("RANK", "1")
    for world in (None, "1"):
        if world:
            monkeypatch.setenv("WORLD_SIZE", world)
        ran = main_in_process(evaluate, capsys)
        check_ok(ran)
        assert json.loads(ran.stdout)["samples"] == 20

    def stopped(accelerator, config):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "load_images", stopped)
    ran = main_in_process(small_train_args(data_dir, tmp_path / "train"), capsys)
    assert ran.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in ran.stderr, ran.stderr

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    assert "RANK=2 is not below WORLD_SIZE=2" in one_error_line(main_in_process(evaluate, capsys))
