"""Real multi-process runs: the same result at any process count, one writer, no hangs.

Every run here is a real process tree: `python -m vae_dist` for one process, and
`accelerate launch --multi_gpu` (torchrun, gloo CPU ranks) for several. Runs are shared
between tests through module-scoped fixtures, so the file costs about a dozen launches.
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

from conftest import REPO, cli_env, free_port, launch_cmd, run_cli, run_launch

# Real processes (the CLI, accelerate launch, launch scripts): the slow tier.
pytestmark = pytest.mark.slow

# 640 images, 2 epochs: 10 global steps of 64 per epoch, 20 in all, across an epoch
# boundary (a new permutation and a new noise table). The eval batch is 48 so the test
# split is sharded into uneven rounds (250 = 5 x 48 + 10; 501 = 10 x 48 + 21).
TRAIN_SAMPLES, EPOCHS, STEPS, GLOBAL_BATCH = 640, 2, 20, 64
EVAL_SAMPLES, EVAL_BATCH = 250, 48
# Runs at different process counts sum each gradient in another order, so they agree only
# to float rounding, and training can amplify that: where a ReLU input sits within rounding
# of zero, one run fires the unit and the other does not. Over seeds 0, 4-7 and 42, with
# the fused and the per-tensor Adam alike, 1x64 vs 2x32 after 20 steps gave a root-mean-
# square weight difference of 2e-9..1.7e-5, while the largest single difference reached
# 1.5e-3 (seed 7, both kernels) and 8.7e-4 (seed 42, fused): flips. A sharding or
# noise-keying bug moves nearly every weight (the negative control below: RMS
# 2.8e-3..3.1e-3), so the RMS is the statistic that separates the two.
WEIGHT_RMS_TOL = 1e-4
# 10x the default rate: Adam moves each weight by up to ~lr per step, so 20 steps move
# weights by ~2e-2, far more than the tolerance (at 1e-4 they would move only ~2e-3).
LR = "1e-3"
SLOW = 60  # seconds: generous, for a shared 2-core machine; a hang is what it catches


def train_args(data_dir: Path, art: Path, config: Path, *more: str, cpu: bool = True) -> list[str]:
    return [
        "train", *(["--cpu"] if cpu else []), "--config", str(config), "--data-dir", str(data_dir),
        "--artifact-dir", str(art), "--limit-train-samples", str(TRAIN_SAMPLES),
        "--limit-eval-samples", str(EVAL_SAMPLES), "--num-workers", "0", "--wandb-mode", "disabled",
        "--epochs", str(EPOCHS), "--max-steps", str(STEPS), "--learning-rate", LR, *more,
    ]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    return r


def weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(str(art / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def rms_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Root-mean-square of the elementwise difference over every weight of the model."""
    assert a.keys() == b.keys()
    d = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a])
    return d.pow(2).mean().sqrt().item()


def metrics(art: Path) -> list[dict]:
    return [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines() if line.strip()]


def models_under(root: Path) -> list[Path]:
    """Final models anywhere under root (checkpoint copies excluded)."""
    return [p for p in root.rglob("model.safetensors") if "checkpoints" not in p.relative_to(root).parts]


def run_tree(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, float]:
    """Run cmd in its own session; on timeout kill the whole tree (launcher and ranks).
    Returns (exit status or None if it timed out, stdout+stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, out, time.monotonic() - t0


def assert_one_artifact_set(tmp: Path, art: Path, *, ranks: int, epochs: int = EPOCHS) -> None:
    assert models_under(tmp) == [art / "model.safetensors"], models_under(tmp)
    assert (art / "config.json").is_file()
    rows = metrics(art)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), rows
    ckpts = sorted(p for p in (art / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step-{s:09d}" for s in (10, 20)], ckpts  # epoch ends, keep 2
    for c in ckpts:
        assert (c / "MANIFEST.json").is_file()
        assert sorted(p.name for p in c.glob("random_states_*.pkl")) == [f"random_states_{r}.pkl" for r in range(ranks)]
    pngs = sorted(p.name for p in (art / "images").iterdir())
    assert pngs == [f"epoch-{e:03d}-{k}.png" for e in range(1, epochs + 1) for k in ("reconstructions", "samples")]


# ------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "eval48.json"
    p.write_text(json.dumps({"data": {"eval_batch_size": EVAL_BATCH}}))
    return p


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, data_dir, eval_config):
    """1 process x batch 64."""
    tmp = tmp_path_factory.mktemp("one")
    art = tmp / "art"
    r = ok(run_cli(train_args(data_dir, art, eval_config, "--batch-size", str(GLOBAL_BATCH))))
    return tmp, art, r


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, data_dir, eval_config):
    """2 processes x batch 32: the same global batch."""
    tmp = tmp_path_factory.mktemp("two")
    art = tmp / "art"
    r = ok(run_launch(2, train_args(data_dir, art, eval_config, "--batch-size", str(GLOBAL_BATCH // 2))))
    return tmp, art, r


# ------------------------------------------------------------------ 1. end to end


@pytest.mark.parametrize("which", ["one_proc", "two_proc"])
def test_end_to_end_one_artifact_set_and_evaluate_matches_log(which, request):
    tmp, art, r = request.getfixturevalue(which)
    ranks = 1 if which == "one_proc" else 2
    assert f"{ranks} process(es)" in r.stdout
    assert_one_artifact_set(tmp, art, ranks=ranks)
    rows = metrics(art)
    for row in rows:  # the global batch is 64 at either process count
        assert row["train/samples"] == TRAIN_SAMPLES and row["valid/samples"] == EVAL_SAMPLES
    assert rows[-1]["step"] == STEPS
    ev = json.loads(ok(run_cli(["evaluate", str(art), "--json"])).stdout.strip().splitlines()[-1])
    assert ev["samples"] == EVAL_SAMPLES
    logged = rows[-1]["valid/loss"]
    assert ev["loss"] == pytest.approx(logged, rel=1e-6), (ev, logged)


# ------------------------------------------------------------------ 2. invariance


def test_weights_do_not_depend_on_process_count(one_proc, two_proc, tmp_path, data_dir, eval_config):
    a, b = weights(one_proc[1]), weights(two_proc[1])
    d = rms_diff(a, b)
    print(f"\n1 x 64 vs 2 x 32 after {STEPS} steps: weight difference RMS {d:.3e}, max {max_diff(a, b):.3e}")
    assert d < WEIGHT_RMS_TOL, f"1 x 64 and 2 x 32 differ by RMS {d:.3e} (tolerance {WEIGHT_RMS_TOL})"
    # The logged training losses are sums over the same samples, so they agree too.
    for r1, r2 in zip(metrics(one_proc[1]), metrics(two_proc[1])):
        assert r1["step"] == r2["step"]
        assert r1["train/loss"] == pytest.approx(r2["train/loss"], rel=1e-5)
        assert r1["valid/loss"] == pytest.approx(r2["valid/loss"], rel=1e-5)

    # Negative control: the comparison must be able to fail. The same seed, so the same
    # initial weights, data order and noise table, but another global batch (1 x 32):
    # only how samples are grouped into steps differs, which is exactly what a sharding
    # or noise-keying bug would change.
    batch_art = tmp_path / "batch"
    ok(run_cli(train_args(data_dir, batch_art, eval_config, "--batch-size", str(GLOBAL_BATCH // 2))))
    d_batch = rms_diff(a, weights(batch_art))
    print(f"negative control, 1 x 32 vs 1 x 64 from the same seed: RMS {d_batch:.3e}")
    assert d_batch > 10 * WEIGHT_RMS_TOL, f"another global batch differs by only RMS {d_batch:.3e}"


def test_binarized_iw_cosine_runs_do_not_depend_on_process_count(tmp_path, data_dir, eval_config):
    """The literature's recipe: dynamic binarization (coins keyed by sample index), the
    K-sample bound (K noise rows per sample) and a cosine schedule (a function of the step)."""
    recipe = ["--model", "burda", "--binarize", "dynamic", "--iw-train-samples", "3", "--lr-schedule", "cosine",
              "--warmup-epochs", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run_cli(train_args(data_dir, one, eval_config, "--batch-size", str(GLOBAL_BATCH), *recipe)))
    ok(run_launch(2, train_args(data_dir, two, eval_config, "--batch-size", str(GLOBAL_BATCH // 2), *recipe)))
    d = rms_diff(weights(one), weights(two))
    print(f"\nbinarized IW-3 cosine, 1 x 64 vs 2 x 32: weight difference RMS {d:.3e}")
    assert d < WEIGHT_RMS_TOL
    for r1, r2 in zip(metrics(one), metrics(two)):
        assert r1["valid/loss"] == pytest.approx(r2["valid/loss"], rel=1e-5)
        assert r1["train/lr"] == r2["train/lr"]
    # The control: another seed draws other coins and noise, and so other weights.
    other = tmp_path / "other"
    ok(run_cli(train_args(data_dir, other, eval_config, "--batch-size", str(GLOBAL_BATCH), "--seed", "7", *recipe)))
    assert rms_diff(weights(one), weights(other)) > 10 * WEIGHT_RMS_TOL


# ------------------------------------------------------------------ 3. validation


def reference_loss(art: Path, data_dir: Path, n: int) -> float:
    """The test loss computed here, in one process without Accelerate."""
    from vae_dist.artifacts import load_model_file
    from vae_dist.data import load_split
    from vae_dist.loss import negative_elbo
    from vae_dist.noise import eval_noise

    model, cfg = load_model_file(art)
    model.eval()
    x = load_split(data_dir, "test").images[:n].float().div(255.0)
    with torch.no_grad():
        out = model(x, eval_noise(cfg.seed, n, model.latent_size))
        p = negative_elbo(out.logits, out.mu, out.logvar, x, kind=cfg.loss.recon_loss, kl_weight=cfg.loss.kl_weight)
    return p.total.double().mean().item()


def test_validation_same_at_1_2_3_processes(two_proc, data_dir):
    art, n = two_proc[1], 501  # 501 = 10 x 48 + 21: uneven rounds at 2 and 3 processes
    args = ["evaluate", str(art), "--limit-eval-samples", str(n), "--iw-samples", "30", "--json"]
    results = {1: ok(run_cli(args)).stdout}
    for procs in (2, 3):
        results[procs] = ok(run_launch(procs, args)).stdout
    parsed = {}
    for procs, out in results.items():
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert len(lines) == 1, f"{procs} processes printed {len(lines)} JSON lines:\n{out}"  # rank 0 only
        parsed[procs] = json.loads(lines[0])
        assert parsed[procs]["processes"] == procs
        assert parsed[procs]["samples"] == n
    print("\n" + "  ".join(f"{p} proc: {v['loss']:.10f}" for p, v in parsed.items()))
    for procs in (2, 3):
        for key in ("loss", "recon", "kl"):
            assert parsed[procs][key] == pytest.approx(parsed[1][key], rel=1e-6), (procs, key, parsed)
        # Each image's importance samples are keyed by its index and summed in index order;
        # only the matrix products' rounding depends on which images share a batch.
        assert parsed[procs]["iw_nll"] == pytest.approx(parsed[1]["iw_nll"], rel=1e-9)
        assert parsed[procs]["protocol"] == parsed[1]["protocol"]
    assert parsed[1]["protocol"]["iw_samples"] == 30 and parsed[1]["protocol"]["test_images"] == n
    assert parsed[1]["iw_nll"] < parsed[1]["loss"]  # a tighter bound than the ELBO
    assert parsed[1]["loss"] == pytest.approx(reference_loss(art, data_dir, n), rel=1e-5)


# ------------------------------------------------------------------ 4. one writer


def test_one_writer_with_wandb_offline(tmp_path, data_dir, eval_config):
    art, wandb_dir = tmp_path / "art", tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    every, keep = 3, 2
    env = cli_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir))
    args = train_args(
        data_dir, art, eval_config, "--batch-size", "32", "--checkpoint-every-steps", str(every),
        "--keep-checkpoints", str(keep),
    )
    args[args.index("--wandb-mode") + 1] = "offline"
    r = ok(run_launch(2, args, env=env))
    assert "2 process(es)" in r.stdout

    runs = list(wandb_dir.rglob("offline-run-*"))
    assert len(runs) == 1, runs
    assert not (art / "wandb").exists()  # WANDB_DIR wins; nothing else wrote a run
    assert models_under(tmp_path) == [art / "model.safetensors"]
    rows = metrics(art)
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1)), rows

    # Saved: every `every` steps and at each epoch end; each announced once (rank 0).
    steps_per_epoch = TRAIN_SAMPLES // GLOBAL_BATCH
    expected = sorted(set(range(every, STEPS + 1, every)) | set(range(steps_per_epoch, STEPS + 1, steps_per_epoch)))
    announced = re.findall(r"checkpoint \S*step-(\d{9}) written", r.stdout)
    assert sorted(int(s) for s in announced) == expected, announced
    folders = sorted(p.name for p in (art / "checkpoints").iterdir())
    assert folders == [f"step-{s:09d}" for s in expected[-min(keep, len(expected)):]], folders
    for name in folders:
        c = art / "checkpoints" / name
        assert len(list(c.glob("MANIFEST.json"))) == 1
        assert json.loads((c / "MANIFEST.json").read_text())["global_step"] == int(name[5:])
        assert sorted(p.name for p in c.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]


# ------------------------------------------------------------------ 5. no hangs


def test_one_rank_failing_ends_the_job(tmp_path, data_dir, eval_config):
    art = tmp_path / "art"
    env = cli_env(VAE_DIST_TEST_FAIL_AT="1:3")
    rc, out, seconds = run_tree(launch_cmd(2, train_args(data_dir, art, eval_config, "--batch-size", "32")), env, SLOW)
    assert rc is not None, f"still running after {SLOW} s (killed):\n{out[-3000:]}"
    assert rc != 0, out[-3000:]
    assert "test fault injected on rank 1 at step 3" in out
    assert not (art / "model.safetensors").exists()
    print(f"\nrank 1 failure: job ended in {seconds:.1f} s")


def test_data_error_on_every_rank_is_one_line(tmp_path):
    args = ["train", "--cpu", "--data-dir", "/nonexistent", "--artifact-dir", str(tmp_path / "art"),
            "--num-workers", "0", "--wandb-mode", "disabled"]
    rc, out, seconds = run_tree(launch_cmd(2, args), cli_env(), SLOW)
    assert rc is not None, f"still running after {SLOW} s (killed):\n{out[-3000:]}"
    assert rc != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors and set(errors) == {"error: data directory /nonexistent does not exist"}, out[-3000:]
    assert "DataError" not in out  # no traceback from our side


# ------------------------------------------------------------------ 6. no GPU, no --cpu


def test_multi_gpu_launch_without_gpu_or_cpu_flag_is_one_run(tmp_path, data_dir, eval_config):
    art = tmp_path / "art"
    args = train_args(data_dir, art, eval_config, "--batch-size", "32", "--epochs", "1", cpu=False)
    assert "--cpu" not in args
    # Hide any GPU so the case is the same on every machine.
    r = subprocess.run(
        launch_cmd(2, args), cwd=REPO, env=cli_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300
    )
    ok(r)
    assert "no GPU found: running the 2 processes as CPU (gloo) ranks" in r.stdout
    assert r.stdout.count("process(es)") == 1 and "2 process(es) on cpu" in r.stdout, r.stdout
    assert models_under(tmp_path) == [art / "model.safetensors"]
    (row,) = metrics(art)
    # One run with global batch 64 takes 10 steps; two independent ones would take 20 each.
    assert row["step"] == TRAIN_SAMPLES // GLOBAL_BATCH and row["train/samples"] == TRAIN_SAMPLES


# ------------------------------------------------------------------ 7. two machines


def test_two_machines_on_loopback(tmp_path, data_dir, eval_config, two_proc):
    art = tmp_path / "art"
    port = free_port()
    args = train_args(data_dir, art, eval_config, "--batch-size", "32")
    procs, logs = [], []
    for machine in (0, 1):
        log = tmp_path / f"machine{machine}.log"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vae_dist", *args,
        ]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + 240
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out0, out1 = (log.read_text() for log in logs)
    assert codes == [0, 0], f"exit codes {codes}\n--- machine 0\n{out0[-3000:]}\n--- machine 1\n{out1[-3000:]}"
    assert "2 process(es)" in out0
    assert models_under(tmp_path) == [art / "model.safetensors"]
    assert [r["step"] for r in metrics(art)] == [10, 20]
    # Two machines x 1 process is the same run as one machine x 2 processes.
    a, b = weights(art), weights(two_proc[1])
    d = rms_diff(a, b)
    print(f"\n2 machines x 1 vs 1 machine x 2: weight difference RMS {d:.3e}, max {max_diff(a, b):.3e}")
    assert d < WEIGHT_RMS_TOL, d


# ------------------------------------------------------------------ 8. a clean exit


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_finished_ranks_join_their_gloo_threads_before_exit(tmp_path, data_dir, eval_config):
    """A gloo process group still alive at interpreter teardown joins its threads there, and
    that can abort a rank whose run has finished ("terminate called without an active
    exception", exit -6, seen in CI): by the time train() returns, no gloo thread is left."""
    script = tmp_path / "train_then_list_threads.py"
    listed = tmp_path / "threads"
    listed.mkdir()
    # Each rank writes its own file: two ranks printing to one stdout can interleave their lines.
    script.write_text(
        "import glob, os, sys\n"
        "from vae_dist.cli import main\n"
        "main(sys.argv[1:])\n"
        "names = sorted(open(p).read().strip() for p in glob.glob('/proc/self/task/*/comm'))\n"
        f"open(os.path.join({str(listed)!r}, 'rank-' + os.environ['RANK']), 'w').write(' '.join(names))\n"
    )
    args = train_args(data_dir, tmp_path / "art", eval_config, "--batch-size", "32")
    cmd = launch_cmd(2, [])[:-2] + [str(script), *args]  # the script instead of `-m vae_dist`
    ok(subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300))
    threads = {p.name: p.read_text() for p in listed.iterdir()}
    assert sorted(threads) == ["rank-0", "rank-1"], threads
    for rank, names in threads.items():
        assert names and "gloo" not in names, (rank, names)
