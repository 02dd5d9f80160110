"""CPU scaling: one process vs two for the same global batch, and where a two-process step's time goes.

Part 1 (the trainer): ``vae-dist train --cpu`` for a fixed number of steps at global batch
128, as 1 process x batch 128 (OMP_NUM_THREADS=2) and as 2 gloo processes x batch 64
(``accelerate launch --multi_gpu``, OMP_NUM_THREADS=1 each), for the conv and mlp models;
steps/s = ``samples_per_second`` from metrics.jsonl / 128. Both use the machine's two
cores, so the comparison is "two threads in one process" against "two processes".

Part 2 (the breakdown): this file re-launched as a worker (``--worker``) that mimics one
train step with Accelerate's DDP over gloo and times it in pieces, per rank:

- data: next batch from the prepared (sharded) loader + the per-sample noise lookup;
- compute: forward, loss and backward with DDP's gradient sync switched off (``no_sync``);
- wait: a barrier, i.e. time spent waiting for the slower rank (load imbalance);
- all-reduce: the gradients flattened into one tensor (DDP's one 25 MB bucket holds the
  whole model) and all-reduced over gloo;
- optimizer: Adam step and zero_grad;
and then the real DDP step (backward with its hooks, which overlap the all-reduce with
backward) for comparison with the sum of the pieces.

    python benchmarks/scaling.py                 # both parts, both models
    python benchmarks/scaling.py --skip-trainer  # only the breakdown
    python benchmarks/scaling.py -- --learning-rate 1e-3   # extra train flags for part 1

Any argument the script does not know (or everything after --) is a flag of
``python -m vae_dist train``, checked by its parser (vae_dist.cli.app.parse_train_args) and
added to part 1's trainer commands (not the flags the script sets itself: model, batch
size, steps, data).

The numbers are wall-clock on a shared machine: run it on an idle one, or read them as
rough (``other_cpu_cores`` in the JSON says how busy it was). Measured figures belong in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 128
# (processes, batch per process, OMP threads per process): two cores either way; the
# third, one process on one thread, separates "two threads" from "two processes".
LAYOUTS = [(1, 128, 2), (2, 64, 1), (1, 128, 1)]


def env_for(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
                "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    return env


def launcher(procs: int, port: int) -> list[str]:
    if procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


# ------------------------------------------------------------------ part 1: the trainer


def run_trainer(model: str, procs: int, batch: int, threads: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    art = tmp / f"{model}-{procs}p-{threads}t"
    cmd = launcher(procs, common.free_port()) + [
        "-m", "vae_dist", "train", "--cpu", "--model", model, "--data-dir", str(args.data_dir),
        "--artifact-dir", str(art), "--batch-size", str(batch), "--max-steps", str(args.max_steps),
        "--limit-train-samples", str(args.limit_train_samples), "--limit-eval-samples", "100",
        "--num-workers", "0", "--wandb-mode", "disabled", "--epochs", "1", *args.train_args,
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env_for(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"trainer run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    row = common.read_metrics(art)[-1]
    return {
        "model": model, "processes": procs, "batch_per_process": batch, "omp_threads": threads,
        "steps": row["step"], "samples_per_second": row["samples_per_second"],
        "steps_per_second": row["samples_per_second"] / GLOBAL_BATCH, "wall_s": wall,
    }


# ------------------------------------------------------------------ part 2: the worker


def worker(args: argparse.Namespace) -> None:
    from vae_dist.training.runtime import prepare_process

    prepare_process(True)  # the trainer's process settings (as its CLI applies them), before any tensor work
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from vae_dist.config import ModelConfig, TrainingConfig
    from vae_dist.data.loaders import MnistImages, make_loader
    from vae_dist.data.datasets import load_split
    from vae_dist.models import build
    from vae_dist.data.keyed import TRAIN_NOISE, noise as keyed_noise

    acc = Accelerator(cpu=True)
    world = acc.num_processes
    batch = GLOBAL_BATCH // world
    images = load_split(args.data_dir, "train").images[: args.limit_train_samples]
    set_seed(0)
    model = build(TrainingConfig(model=ModelConfig(kind=args.model)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = make_loader(MnistImages(images), batch, shuffle_seed=0, drop_last=True, num_workers=0)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    noise = keyed_noise(TRAIN_NOISE, 0, 0, images.shape[0], model.noise_shape(1))
    params = [p for p in model.parameters() if p.requires_grad]
    epoch, it = 0, iter(loader)

    def next_batch():
        nonlocal epoch, it
        try:
            return next(it)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            return next(it)

    def loss_of(x, idx):
        return model(x, noise[idx]).terms["loss"].mean()

    no_sync = model.no_sync if world > 1 else contextlib.nullcontext
    names = ["data", "compute", "wait", "all-reduce", "optimizer"]
    split = {k: 0.0 for k in names}
    real = {"data": 0.0, "fwd+bwd+sync": 0.0, "optimizer": 0.0}

    def split_step(record: bool) -> None:
        t0 = time.perf_counter()
        x, idx = next_batch()
        t1 = time.perf_counter()
        with no_sync():
            loss_of(x, idx).backward()
        t2 = time.perf_counter()
        if world > 1:
            dist.barrier()
        t3 = time.perf_counter()
        if world > 1:
            grads = [p.grad for p in params]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(world)
            for g, new in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(new)
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        t5 = time.perf_counter()
        if record:
            for k, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                split[k] += dt

    def real_step(record: bool) -> None:
        t0 = time.perf_counter()
        x, idx = next_batch()
        t1 = time.perf_counter()
        acc.backward(loss_of(x, idx))  # DDP: all-reduce overlapped with backward
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        t3 = time.perf_counter()
        if record:
            real["data"] += t1 - t0
            real["fwd+bwd+sync"] += t2 - t1
            real["optimizer"] += t3 - t2

    n = args.profile_steps
    for _ in range(args.warmup_steps):
        split_step(False)
        real_step(False)
    # Interleaved, so drifts in machine load hit both the same way.
    acc.wait_for_everyone()
    t_split = t_real = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        split_step(True)
        t1 = time.perf_counter()
        real_step(True)
        t2 = time.perf_counter()
        t_split += t1 - t0
        t_real += t2 - t1
    mine = [split[k] / n * 1e3 for k in names] + [t_split / n * 1e3] + [real[k] / n * 1e3 for k in real] + [t_real / n * 1e3]
    everyone = acc.gather(torch.tensor([mine], dtype=torch.float64)).tolist()
    if acc.is_main_process:
        keys = [f"split/{k}" for k in names] + ["split/total"] + [f"real/{k}" for k in real] + ["real/total"]
        print("RESULT " + json.dumps({
            "model": args.model, "processes": world, "batch_per_process": batch,
            "omp_threads": torch.get_num_threads(), "steps": n,
            "ranks_ms": [dict(zip(keys, row)) for row in everyone],
        }))
    acc.end_training()


def run_breakdown(model: str, procs: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = launcher(procs, common.free_port()) + [
        str(Path(__file__).resolve()), "--worker", "--model", model, "--data-dir", str(args.data_dir),
        "--limit-train-samples", str(args.limit_train_samples), "--profile-steps", str(args.profile_steps),
        "--warmup-steps", str(args.warmup_steps),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env_for(threads), capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"breakdown run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX folder [default: vae_dist.data.datasets.default_data_dir()]")
    p.add_argument("--models", nargs="+", default=["conv", "mlp"], choices=["conv", "mlp"])
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--limit-train-samples", type=int, default=25600)
    p.add_argument("--profile-steps", type=int, default=100, help="timed steps of each kind in the breakdown")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--layout", action="append", metavar="PROCS:THREADS",
                   help="process count and OMP threads per process, repeatable [default: 1:2 2:1 1:1]")
    p.add_argument("--skip-trainer", action="store_true")
    p.add_argument("--skip-breakdown", action="store_true")
    p.add_argument("--json", action="store_true", help="also print everything as one JSON object at the end")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)  # the worker's; --models otherwise
    args, rest = p.parse_known_args()
    if args.data_dir is None:
        args.data_dir = common.mnist.default_data_dir()
    if args.worker:
        worker(args)
        return
    if args.model is not None:
        p.error("--model: use --models (each model is run in turn)")
    args.train_args = rest[1:] if rest[:1] == ["--"] else rest
    taken = sorted({a.split("=")[0] for a in args.train_args} & {"--batch-size", "--artifact-dir", "--cpu", "--no-cpu"})
    if taken:  # each layout sets these itself
        p.error(f"{', '.join(taken)}: set by this script for each layout")
    try:  # the trainer's own parser, so a wrong flag fails here and not in the first subprocess
        common.parse_train_args(["--cpu", "--data-dir", str(args.data_dir), *args.train_args])
    except Exception as e:
        p.error(f"train flags: {e.format_message() if hasattr(e, 'format_message') else e}")
    layouts = LAYOUTS
    if args.layout:
        layouts = []
        for spec in args.layout:
            procs, threads = (int(v) for v in spec.split(":"))
            if GLOBAL_BATCH % procs:
                raise SystemExit(f"{procs} processes do not divide the global batch {GLOBAL_BATCH}")
            layouts.append((procs, GLOBAL_BATCH // procs, threads))

    other = common.OtherLoad()
    out: dict[str, Any] = {"mode": "scaling", **common.environment(common.resolve_device("cpu")),
                           "train_args": args.train_args, "trainer": [], "breakdown": []}
    print(f"{os.cpu_count()} CPUs; global batch {GLOBAL_BATCH}; layouts (processes, batch, OMP threads): {layouts}")
    if not args.skip_trainer:
        print(f"\n1. trainer, {args.max_steps} steps, {args.limit_train_samples} training images (samples_per_second from metrics.jsonl)")
        print(f"{'model':<6} {'procs':>5} {'batch':>5} {'omp':>3} {'samples/s':>10} {'steps/s':>8} {'vs 1 proc':>9} {'wall s':>7}")
        with tempfile.TemporaryDirectory(prefix="vae-scaling-") as tmp:
            for model in args.models:
                base = None
                for procs, batch, threads in layouts:
                    r = run_trainer(model, procs, batch, threads, args, Path(tmp))
                    base = base or r["steps_per_second"]
                    out["trainer"].append(r)
                    print(f"{model:<6} {procs:>5} {batch:>5} {threads:>3} {r['samples_per_second']:>10,.0f} "
                          f"{r['steps_per_second']:>8.2f} {r['steps_per_second'] / base:>8.2f}x {r['wall_s']:>7.1f}")
    if not args.skip_breakdown:
        print(f"\n2. one step in pieces, ms per step (mean of {args.profile_steps} steps; 2 processes: rank 0 / rank 1)")
        cols = ["data", "compute", "wait", "all-reduce", "optimizer", "total"]
        print(f"{'model':<6} {'procs':>5} {'omp':>3} " + " ".join(f"{c:>13}" for c in cols) + f" {'real DDP step':>14}")
        for model in args.models:
            for procs, _batch, threads in layouts:
                b = run_breakdown(model, procs, threads, args)
                out["breakdown"].append(b)
                ranks = b["ranks_ms"]

                def cell(key: str) -> str:
                    return "/".join(f"{r[key]:.2f}" for r in ranks)

                print(f"{model:<6} {procs:>5} {threads:>3} " + " ".join(f"{cell('split/' + c):>13}" for c in cols)
                      + f" {cell('real/total'):>14}")
        print("compute = forward+loss+backward without gradient sync; wait = barrier (skew between ranks);"
              " real DDP step = data + backward with DDP's overlapped all-reduce + optimizer")
    out.update(load_avg_1m_at_end=common.load_avg(), other_cpu_cores=other.cores())
    print(f"other processes used {out['other_cpu_cores']} cores during the run")
    if args.json:
        print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
