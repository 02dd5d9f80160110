"""Seconds per epoch: the vae_dist trainer against a bare loop and the usual per-sample loader.

One run, one config (built from train flags as ``python -m vae_dist train`` builds it):

- trainer_s_per_epoch: ``vae_dist.training.trainer.train(config)``, training seconds per epoch
  (epoch_seconds - valid_seconds from metrics.jsonl), median of the epochs after the first;
- bare_loop_s_per_epoch: the floor: the training images as one float tensor on the device,
  a seeded randperm per epoch, index_select / forward / negative_elbo / backward / Adam;
  median of --epochs epochs after one warm-up epoch, half timed before the trainer and
  half after it (a machine's speed drifts);
- reference_loader_s_per_epoch: torchvision's MNIST with ToTensor in a shuffling DataLoader
  (per-sample PIL -> tensor, default collate) feeding the same bare step.

See benchmarks/README.md for the commands and the measured figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import common
from common import log, median, ratio

# Targets (see README). CPU: the trainer at most this much over the bare loop, and at least
# this much faster than the per-sample loader; GPU: the latter factor, and an H100 MLP epoch bound.
CPU_MAX_TRAINER_OVER_BARE = 1.05
CPU_MIN_REFERENCE_OVER_TRAINER = 2.0
GPU_MIN_REFERENCE_OVER_TRAINER = 20.0
GPU_MAX_MLP_EPOCH_S = 0.25
MAX_VALID_FRACTION = 0.10
REFERENCE_WARMUP_STEPS = 200


def measure_trainer(config) -> dict[str, Any]:
    rows, wall = common.run_trainer(config)
    train_s = [r["epoch_seconds"] - r["valid_seconds"] for r in rows]
    valid_s = [r["valid_seconds"] for r in rows]
    per_epoch, valid = median(train_s[1:]), median(valid_s[1:])  # epoch 1 is warm-up (allocation, compile)
    return {
        "trainer_s_per_epoch": per_epoch, "trainer_epoch_train_s": train_s, "trainer_epoch_valid_s": valid_s,
        "valid_s": valid, "valid_fraction": ratio(valid, per_epoch), "trainer_wall_s": wall,
        "trainer_steps_per_epoch": rows[-1]["step"] // len(rows) if rows else None,
        "trainer_final_valid_loss": rows[-1]["valid/loss"] if rows else None,
    }


class BareLoop:
    """The floor, timed a few epochs at a time: ``epochs(k)`` runs k epochs (the first call
    one warm-up epoch more) and returns their seconds. The run times it before and after
    the trainer, so a machine whose speed drifts during the run biases neither figure."""

    def __init__(self, config, device, images_u8) -> None:
        import torch

        self.device, self.b = device, config.data.batch_size
        self.x_all = images_u8.to(device).float().div_(255.0)
        self.steps = self.x_all.shape[0] // self.b  # full batches only, as the trainer (drop_last=True)
        self.step = common.BareStep(config, device)
        self.gen = torch.Generator(device=device).manual_seed(config.seed)
        self.done, self.loss = 0, float("nan")

    def epochs(self, k: int) -> list[float]:
        import torch

        times = []
        for _ in range(k + (self.done == 0)):  # epoch 0 is the warm-up
            common.sync(self.device)
            t0 = time.perf_counter()
            perm = torch.randperm(self.x_all.shape[0], generator=self.gen, device=self.device)
            last = None
            for i in range(self.steps):
                last = self.step(self.x_all.index_select(0, perm[i * self.b : (i + 1) * self.b]))
            self.loss = float(last.item()) if last is not None else float("nan")  # also a device sync
            common.sync(self.device)
            dt = time.perf_counter() - t0
            log(f"bare loop epoch {self.done}{' (warm-up)' if self.done == 0 else ''}: {dt:.2f} s, last batch loss {self.loss:.2f}")
            times += [dt] if self.done else []
            self.done += 1
        return times


def measure_reference(config, args, device) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    root = common.torchvision_root(Path(config.data.data_dir).expanduser())
    dataset = datasets.MNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
    if config.data.limit_train_samples:
        dataset = Subset(dataset, range(min(config.data.limit_train_samples, len(dataset))))
    torch.manual_seed(config.seed)  # the DataLoader's shuffle draws from the global RNG
    loader = DataLoader(dataset, batch_size=config.data.batch_size, shuffle=True, num_workers=config.data.num_workers)
    step = common.BareStep(config, device, usual_adam=args.reference_adam == "usual")
    per_epoch = len(loader)

    def timed(limit: Optional[int]) -> tuple[float, int]:
        common.sync(device)
        t0, last, count = time.perf_counter(), None, 0
        for x, _ in loader:
            if limit is not None and count >= limit:
                break
            last, count = step(x.to(device)), count + 1
        if last is not None:
            last.item()
        common.sync(device)
        return time.perf_counter() - t0, count

    warm_s, warm_n = timed(min(REFERENCE_WARMUP_STEPS, per_epoch))
    log(f"reference loader warm-up: {warm_n} steps in {warm_s:.2f} s")
    limit, times = args.reference_batches or None, []
    for epoch in range(args.reference_epochs):
        dt, count = timed(limit)
        times.append(dt * per_epoch / count)
        log(f"reference loader epoch {epoch + 1}: {count} batches in {dt:.2f} s -> {times[-1]:.2f} s per epoch")
    if limit is None or limit >= per_epoch:
        how = f"full epoch(s) ({per_epoch} batches, the last one partial)"
    else:
        how = f"timing(s) of the first {limit} batches of an epoch (worker start-up included), scaled to {per_epoch}"
    method = f"median of {args.reference_epochs} {how}, after a {warm_n}-step warm-up"
    return {"reference_loader_s_per_epoch": median(times), "reference_epoch_s": times, "reference_method": method}


def check_targets(r: dict[str, Any]) -> dict[str, Optional[bool]]:
    """Which README targets this run meets (None where a figure is missing)."""

    def cmp(v: Optional[float], ok) -> Optional[bool]:
        return None if v is None else ok(v)

    checks = {f"valid_fraction < {MAX_VALID_FRACTION:g}": cmp(r["valid_fraction"], lambda v: v < MAX_VALID_FRACTION)}
    if r["device_type"] == "cpu":
        checks[f"trainer_over_bare <= {CPU_MAX_TRAINER_OVER_BARE:g}"] = cmp(
            r["trainer_over_bare"], lambda v: v <= CPU_MAX_TRAINER_OVER_BARE)
        min_ref = CPU_MIN_REFERENCE_OVER_TRAINER
    else:
        if r["model"] == "mlp":
            checks[f"mlp epoch < {GPU_MAX_MLP_EPOCH_S:g} s (H100)"] = cmp(
                r["trainer_s_per_epoch"], lambda v: v < GPU_MAX_MLP_EPOCH_S)
        min_ref = GPU_MIN_REFERENCE_OVER_TRAINER
    checks[f"reference_over_trainer >= {min_ref:g}"] = cmp(r["reference_over_trainer"], lambda v: v >= min_ref)
    return checks


def render(r: dict[str, Any]) -> str:
    lines = common.render_header(r) + [
        f"data        {r['train_samples']} training images, {r['steps_per_epoch']} steps/epoch, "
        f"reference Adam {r['reference_adam']}", "", f"{'figure':<32} {'value':>12}  per-epoch values",
    ]
    for name, unit, values in [
        ("trainer_s_per_epoch", " s", "trainer_epoch_train_s"), ("valid_s", " s", "trainer_epoch_valid_s"),
        ("valid_fraction", "", None), ("bare_loop_s_per_epoch", " s", "bare_loop_epoch_s"),
        ("reference_loader_s_per_epoch", " s", "reference_epoch_s"), ("trainer_over_bare", "x", None),
        ("reference_over_trainer", "x", None), ("trainer_samples_per_s", "", None), ("trainer_wall_s", " s", None),
    ]:
        extra = ", ".join(f"{v:.2f}" for v in r[values]) if values else ""
        lines.append(f"{name:<32} {common.fmt(r[name], unit):>12}  {extra}")
    lines += ["", "trainer: median of epochs 2.. (epoch 1 is warm-up); bare loop: median after 1 warm-up epoch, timed before and after the trainer",
              f"reference: {r['reference_method']}", "", "targets:"]
    return "\n".join(lines + [f"  {name:<40} {common.fmt(ok)}" for name, ok in r["targets"].items()])


def main(argv: Optional[list[str]] = None) -> int:
    p = common.bench_parser("Seconds per epoch of the vae_dist trainer, a bare training loop and the usual per-sample loader.")
    p.add_argument("--reference-adam", choices=["usual", "trainer"], default="usual", help="the reference's optimizer: "
                   "usual = the canonical example's torch.optim.Adam; trainer = the trainer's, so only the loader differs")
    p.add_argument("--reference-epochs", type=int, default=2, help="timed reference-loader epochs")
    p.add_argument("--reference-batches", type=int, default=0, help="time only the first K batches of each reference "
                   "epoch and scale to the epoch (0 = full epochs)")
    p.add_argument("--skip-reference", action="store_true", help="do not measure the reference loader")
    with tempfile.TemporaryDirectory(prefix="vae_dist_bench_") as tmp:
        args, config, train_args = common.parse(p, argv, [*common.DEFAULT_TRAIN_ARGS, "--epochs", "3"], Path(tmp) / "run")
        if config.epochs < 2 or args.reference_epochs < 1 or args.reference_batches < 0:
            p.error("need --epochs >= 2 (the trainer's first is warm-up), --reference-epochs >= 1, --reference-batches >= 0")
        return common.main_wrapper(lambda: run(args, config, train_args))


def run(args, config, train_args) -> int:
    from vae_dist.data import datasets as idx
    from vae_dist.training.runtime import prepare_process

    prepare_process(config.flush_denormal)  # as the CLI does: first, and so for all three loops
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    other, device = common.OtherLoad(), common.resolve_device(args.device)
    with common.json_stdout(args.json) as emit:
        r: dict[str, Any] = {"mode": "throughput", **common.environment(device), **common.settings(config, train_args)}
        images = idx.load_split(config.data.data_dir, "train").images[: config.data.limit_train_samples]
        r.update(train_samples=int(images.shape[0]), reference_adam=args.reference_adam)
        bare, before = BareLoop(config, device, images), (config.epochs + 1) // 2
        log(f"[1/3] bare loop: {before} timed epoch(s) after 1 warm-up epoch on {device}, the rest after the trainer")
        bare_s = bare.epochs(before)
        log(f"[2/3] trainer: vae_dist.training.trainer.train, {config.epochs} epoch(s), epoch 1 counted as warm-up")
        r.update(measure_trainer(config))
        bare_s += bare.epochs(config.epochs - before)
        r.update(bare_loop_s_per_epoch=median(bare_s), bare_loop_epoch_s=bare_s, bare_loop_last_loss=bare.loss,
                 steps_per_epoch=bare.steps)
        del bare, images
        if args.skip_reference:
            log("[3/3] reference loader: skipped")
            r.update(reference_loader_s_per_epoch=None, reference_epoch_s=[], reference_method="skipped")
        else:
            log(f"[3/3] reference loader: torchvision MNIST + ToTensor + DataLoader(num_workers={config.data.num_workers})")
            r.update(measure_reference(config, args, device))
        r["trainer_over_bare"] = ratio(r["trainer_s_per_epoch"], r["bare_loop_s_per_epoch"])
        r["reference_over_trainer"] = ratio(r["reference_loader_s_per_epoch"], r["trainer_s_per_epoch"])
        t = r["trainer_s_per_epoch"]
        r["trainer_samples_per_s"] = r["steps_per_epoch"] * config.data.batch_size / t if t else None
        r.update(targets=check_targets(r), load_avg_1m_at_end=common.load_avg(), other_cpu_cores=other.cores())
        emit(r)
    if not args.json:
        print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
