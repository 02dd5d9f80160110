"""Several processes: the same result at any process count, one writer, no rank left hanging.

Each launch proves several things. The main run is two machines of one gloo rank each on
loopback (two `accelerate launch`, static rendezvous): there both ranks are the main
process of their machine, so only a global-main check keeps the second from writing. It
uses the literature's recipe (dynamic binarization, the 3-sample bound, a cosine schedule),
W&B offline and checkpoints every 3 steps, and is compared with the same run in this
process at 1 x the global batch. Then `evaluate` at 1 and 3 processes, a rank failing
under a launch without GPU or --cpu, and an error that only the main process can see.
"""

from __future__ import annotations

import contextlib
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

from conftest import REPO, check_ok, cli_env, free_port, launch_cmd, main_in_process, run_launch

# 640 images, 2 epochs: 10 global steps of 64 per epoch, 20 in all, across an epoch
# boundary (a new permutation, noise table and binarization draw). 501 test images at an
# eval batch of 48 shard into uneven rounds: at 2 ranks 5 x 96 + 21, at 3 ranks 3 x 144 + 69.
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
SLOW = 60  # seconds for a run that must end by itself: a hang is what it catches


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


@contextlib.contextmanager
def one_thread():
    """This process on one intra-op thread, as each rank is (cli_env): the same rounding in
    the matrix products, and no threads spinning against the other processes' on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_tree(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run cmd in its own session; past SLOW seconds kill the whole tree and fail."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=SLOW)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"still running after {SLOW} s (killed):\n{p.communicate()[0][-3000:]}")
    return p.returncode, out


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
    """2 machines x 1 process x batch 32 on loopback, W&B offline."""
    tmp = tmp_path_factory.mktemp("two")
    art, wandb_dir, threads = tmp / "art", tmp / "wandb-dir", tmp / "threads"
    wandb_dir.mkdir()
    threads.mkdir()
    script = tmp / "train_then_list_threads.py"
    script.write_text(LIST_THREADS)
    args = train_args(data_dir, art, GLOBAL_BATCH // 2, "--wandb-mode", "offline")
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir))
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


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, data_dir) -> Path:
    """1 process x batch 64, in this process: the same global batch."""
    from vae_dist.cli.app import main

    art = tmp_path_factory.mktemp("one") / "art"
    with one_thread():
        main(train_args(data_dir, art, GLOBAL_BATCH, "--wandb-mode", "disabled"))
    return art


# ------------------------------------------------------------------ 1. one run, one writer


@pytest.mark.slow
def test_two_machines_make_one_run_with_one_writer(two_machines):
    art, (out0, out1) = two_machines["art"], two_machines["logs"]
    assert "2 process(es)" in out0
    assert models_under(two_machines["tmp"]) == [art / "model.safetensors"]
    assert len(list(two_machines["wandb_dir"].rglob("offline-run-*"))) == 1
    assert not (art / "wandb").exists()  # WANDB_DIR wins; nothing else wrote a run
    rows = metrics(art)
    assert [(r["epoch"], r["step"], r["train/samples"], r["valid/samples"]) for r in rows] == [
        (e, e * STEPS // EPOCHS, TRAIN_SAMPLES, EVAL_SAMPLES) for e in range(1, EPOCHS + 1)
    ]
    # Saved every EVERY steps and at each epoch end, each announced once, by the global main.
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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_finished_ranks_have_joined_their_gloo_threads(two_machines):
    """A gloo process group still alive at interpreter teardown joins its threads there, and
    that can abort a rank whose run has finished ("terminate called without an active
    exception", exit -6, seen in CI): by the time the CLI returns, no gloo thread is left."""
    threads = {p.name: p.read_text() for p in two_machines["threads"].iterdir()}
    assert sorted(threads) == ["rank-0", "rank-1"], threads
    for rank, names in threads.items():
        assert names and "gloo" not in names, (rank, names)


# ------------------------------------------------------------------ 2. invariance


@pytest.mark.slow
def test_weights_and_log_do_not_depend_on_process_count(two_machines, one_proc, data_dir, tmp_path):
    two = two_machines["art"]
    d = rms_diff(one_proc, two)
    print(f"\n1 x 64 vs 2 machines x 32 after {STEPS} steps: weight difference RMS {d:.3e}")
    assert d < WEIGHT_RMS_TOL, f"1 x 64 and 2 x 32 differ by RMS {d:.3e} (tolerance {WEIGHT_RMS_TOL})"
    # The logged losses are sums over the same samples, and the schedule a function of the step.
    for r1, r2 in zip(metrics(one_proc), metrics(two), strict=True):
        assert r1["step"] == r2["step"] and r1["train/lr"] == r2["train/lr"]
        for key in ("train/loss", "valid/loss", "valid/recon", "valid/kl"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5), key

    # Negative control: the same seed, so the same initial weights, data order, noise and
    # coins, but another global batch (1 x 32): only how samples are grouped into steps
    # differs, which is exactly what a sharding or noise-keying bug would change.
    from vae_dist.cli.app import main

    with one_thread():
        main(train_args(data_dir, tmp_path / "batch32", GLOBAL_BATCH // 2, "--wandb-mode", "disabled"))
    d_batch = rms_diff(one_proc, tmp_path / "batch32")
    print(f"negative control, 1 x 32 vs 1 x 64 from the same seed: RMS {d_batch:.3e}")
    assert d_batch > 10 * WEIGHT_RMS_TOL, f"another global batch differs by only RMS {d_batch:.3e}"


@pytest.mark.slow
def test_evaluate_at_1_and_3_processes_matches_the_two_rank_validation(two_machines, capsys):
    art = two_machines["art"]
    args = ["evaluate", str(art), "--iw-samples", "30", "--json"]
    with one_thread():
        one = main_in_process(args, capsys)
    check_ok(one)
    three = run_launch(3, args)
    check_ok(three)
    results = {}
    for procs, out in ((1, one.stdout), (3, three.stdout)):
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert len(lines) == 1, f"{procs} processes printed {len(lines)} JSON lines:\n{out}"  # rank 0 only
        results[procs] = json.loads(lines[0])
        assert results[procs]["processes"] == procs and results[procs]["samples"] == EVAL_SAMPLES
    print("\n" + "  ".join(f"{p} proc: {v['loss']:.10f} / IW {v['iw_nll']:.10f}" for p, v in results.items()))
    # evaluate scores as training validated: the last logged validation, made by 2 ranks.
    logged = metrics(art)[-1]
    for key in ("loss", "recon", "kl"):
        assert results[1][key] == pytest.approx(logged[f"valid/{key}"], rel=1e-6), key
        assert results[3][key] == pytest.approx(results[1][key], rel=1e-6), key
    # Each image's importance samples are keyed by its index and summed in index order;
    # only the matrix products' rounding depends on which images share a batch.
    assert results[3]["iw_nll"] == pytest.approx(results[1]["iw_nll"], rel=1e-9)
    assert results[3]["protocol"] == results[1]["protocol"] == {**logged["protocol"], "iw_samples": 30}
    assert results[1]["iw_nll"] < results[1]["loss"]  # a tighter bound than the ELBO


# ------------------------------------------------------------------ 3. no rank left hanging


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
def test_a_rank_failing_ends_a_launch_that_found_no_gpu(tmp_path, data_dir):
    """`accelerate launch --multi_gpu` without a GPU and without --cpu is one run of two
    CPU ranks (not two runs that each think they are the only one), and rank 1 failing at
    step 3 ends it, without leaving rank 0 waiting in a collective."""
    art = tmp_path / "art"
    env = cli_env(CUDA_VISIBLE_DEVICES="", VAE_DIST_TEST_FAIL_AT="1:3")  # hide any GPU: the same case everywhere
    rc, out = run_tree(launch_cmd(2, train_args(data_dir, art, GLOBAL_BATCH // 2, "--wandb-mode", "disabled",
                                                cpu=False)), env)
    assert "no GPU found: running the 2 processes as CPU (gloo) ranks" in out, out[-3000:]
    assert out.count("process(es)") == 1 and "2 process(es) on cpu" in out, out[-3000:]
    assert rc != 0 and "test fault injected on rank 1 at step 3" in out, out[-3000:]
    assert not models_under(tmp_path)


@pytest.mark.slow
def test_an_error_only_the_main_process_sees_reaches_every_rank(tmp_path, data_dir):
    """The artifact folder is checked by the main process alone; its refusal is raised on
    rank 1 too (the same one line, exit 2), so neither waits for the other, and the folder
    is left as it was."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "notes.txt").write_text("mine")
    rc, out = run_tree(launch_cmd(2, train_args(data_dir, art, GLOBAL_BATCH // 2, "--wandb-mode", "disabled")),
                       cli_env())
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, out[-3000:]  # one line from each rank
    assert "is not empty and was not created by vae_dist" in errors[0]
    assert rc != 0 and "ArtifactError" not in out, out[-3000:]  # no traceback of ours (torchrun prints its own)
    assert [p.name for p in art.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_the_rank_that_survives_a_killed_peer_ends_with_one_line(tmp_path, data_dir):
    """Ranks started by hand (no torchrun to stop the others): rank 1 is SIGKILLed before
    step 3; rank 0's next collective fails in gloo, and it used to exit with gloo's traceback."""
    port = str(free_port())
    art = tmp_path / "run"
    args = [sys.executable, "-m", "vae_dist", *train_args(data_dir, art, GLOBAL_BATCH // 2, "--wandb-mode", "disabled")]
    procs = []
    for rank in (0, 1):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, VAE_DIST_TEST_FAIL_AT="1:2:kill")
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    try:
        out, err = procs[0].communicate(timeout=SLOW)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 2 and "Traceback" not in err, err[-3000:]
    line = re.findall(r"error: [^\n]*", err)
    assert len(line) == 1 and "another process of this run stopped or cannot be reached" in line[0], err[-3000:]
    assert "--resume" in line[0]
