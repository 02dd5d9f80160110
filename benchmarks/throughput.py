"""Speed benchmark: the vae_dist trainer against a bare loop and the usual per-sample loader.

One run measures, on the same model, batch size and 60,000 training images:

- trainer_s_per_epoch: ``vae_dist.train.train`` (the code path of ``vae-dist train``),
  training seconds per epoch (epoch_seconds - valid_seconds from metrics.jsonl), median
  over the epochs after the first (warm-up);
- bare_loop_s_per_epoch: the floor: all images preloaded as one float tensor on the device,
  a seeded randperm per epoch, index / forward / negative_elbo / backward / Adam; median over
  the epochs after one warm-up epoch;
- reference_loader_s_per_epoch: torchvision's MNIST with ToTensor in a DataLoader
  (per-sample PIL -> tensor, default collate) feeding the same bare loop.

``--time-to-quality TARGET`` instead trains through the trainer and reports when (wall
time and epoch) ``valid/loss`` first reaches TARGET.

With ``--json`` exactly one JSON object goes to stdout; everything else goes to stderr.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

os.environ.setdefault("WANDB_MODE", "disabled")  # never touch the network from a benchmark

import torch  # noqa: E402

from vae_dist import data as vdata  # noqa: E402
from vae_dist.artifacts import read_metrics  # noqa: E402
from vae_dist.errors import VaeDistError  # noqa: E402
from vae_dist.config import DataConfig, LossConfig, ModelConfig, OptimizerConfig, TrainingConfig  # noqa: E402
from vae_dist.loss import negative_elbo  # noqa: E402
from vae_dist.model import VAE  # noqa: E402
from vae_dist.runtime import prepare_process  # noqa: E402
from vae_dist.train import make_optimizer  # noqa: E402

# Targets (see README): the trainer may cost at most this much over the bare loop on CPU...
CPU_MAX_TRAINER_OVER_BARE = 1.15
# ... and must beat the per-sample loader by at least this factor (CPU / GPU).
CPU_MIN_REFERENCE_OVER_TRAINER = 2.0
GPU_MIN_REFERENCE_OVER_TRAINER = 20.0
GPU_MAX_MLP_EPOCH_S = 0.25  # on an H100
MAX_VALID_FRACTION = 0.10
REFERENCE_WARMUP_STEPS = 200


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda given but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def environment(device: torch.device) -> dict[str, Any]:
    import accelerate

    try:
        import torchvision

        tv: Optional[str] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_avg_1m_at_start": _load_avg(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _load_avg() -> Optional[float]:
    """The 1-minute load average: a busy machine makes every figure noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


class OtherLoad:
    """CPU time that other processes used while this run went on, in cores. The load
    average also counts this run's own threads (about 2 here), so it cannot tell a quiet
    machine from a busy one; /proc/stat's busy time minus this process's own can."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), _system_busy_s(), _own_cpu_s()

    def cores(self) -> Optional[float]:
        busy = _system_busy_s()
        if busy is None or self.busy0 is None:
            return None  # not Linux
        wall = time.monotonic() - self.t0
        return round(max(0.0, (busy - self.busy0 - (_own_cpu_s() - self.own0)) / wall), 3) if wall > 0 else None


def _system_busy_s() -> Optional[float]:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# Other processes using more than this many cores make the figures noisy.
MAX_OTHER_CORES = 0.25


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------------- trainer


def trainer_config(
    args: argparse.Namespace, artifact_dir: Path, *, epochs: int, recon_loss: str = "bce"
) -> TrainingConfig:
    """The config `vae-dist train` would build from the equivalent flags."""
    return TrainingConfig(
        model=ModelConfig(kind=args.model),
        optimizer=OptimizerConfig(learning_rate=args.learning_rate, fused=args.fused_adam),
        data=DataConfig(data_dir=str(args.data_dir), batch_size=args.batch_size, num_workers=args.num_workers),
        loss=LossConfig(recon_loss=recon_loss),
        artifact_dir=str(artifact_dir),
        epochs=epochs,
        seed=args.seed,
        log_every_steps=args.log_every_steps,
        cpu=args.device == "cpu",
        mixed_precision=args.mixed_precision,
        compile=args.compile,
        flush_denormal=args.flush_denormal,
        wandb_mode="disabled",
    )


def run_trainer(config: TrainingConfig) -> tuple[list[dict[str, Any]], float]:
    """Train through vae_dist.train.train (stdout diverted to stderr); returns
    (metrics.jsonl rows, wall seconds of the whole train() call)."""
    from vae_dist.train import train  # noqa: F811

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(config)
    wall = time.perf_counter() - t0
    return read_metrics(Path(config.artifact_dir)), wall


def measure_trainer(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vae_dist_bench_") as tmp:
        rows, wall = run_trainer(trainer_config(args, Path(tmp) / "run", epochs=args.epochs))
    train_s = [r["epoch_seconds"] - r["valid_seconds"] for r in rows]
    valid_s = [r["valid_seconds"] for r in rows]
    per_epoch = median(train_s[1:])  # epoch 1 is warm-up (allocations, compile, first pass)
    valid = median(valid_s[1:])
    return {
        "trainer_s_per_epoch": per_epoch,
        "trainer_epoch_train_s": train_s,
        "trainer_epoch_valid_s": valid_s,
        "valid_s": valid,
        "valid_fraction": ratio(valid, per_epoch),
        "trainer_wall_s": wall,
        "trainer_steps_per_epoch": rows[-1]["step"] // len(rows) if rows else None,
        "trainer_final_valid_loss": rows[-1]["valid/loss"] if rows else None,
    }


# ----------------------------------------------------------------------- bare loop


class BareStep:
    """One optimizer step with no framework: forward, negative_elbo, backward, Adam."""

    def __init__(
        self, args: argparse.Namespace, device: torch.device, recon_loss: str = "bce", usual_adam: bool = False
    ):
        torch.manual_seed(args.seed)
        self.device = device
        self.model = VAE.from_config(ModelConfig(kind=args.model)).to(device)
        self.forward: Callable[..., Any] = torch.compile(self.model) if args.compile else self.model
        # The floor uses the trainer's optimizer (make_optimizer, fused unless --no-fused-adam);
        # the usual way, the canonical example's torch.optim.Adam (unless --reference-adam trainer).
        self.optimizer = (
            torch.optim.Adam(self.model.parameters(), lr=args.learning_rate)
            if usual_adam
            else make_optimizer(self.model, OptimizerConfig(learning_rate=args.learning_rate, fused=args.fused_adam))
        )
        self.recon_loss = recon_loss
        self.bf16 = args.mixed_precision == "bf16"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast around the forward only, as Accelerate does; the loss runs in float32.
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            out = self.forward(x)  # eps=None: the model draws torch.randn_like(mu)
        parts = negative_elbo(out.logits, out.mu, out.logvar, x, kind=self.recon_loss, kl_weight=1.0)
        parts.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts.loss.detach()


def measure_bare(args: argparse.Namespace, device: torch.device, images_u8: torch.Tensor) -> dict[str, Any]:
    x_all = images_u8.to(device).float().div_(255.0)
    n, b = x_all.shape[0], args.batch_size
    steps = n // b  # full batches only, as the trainer (drop_last=True)
    step = BareStep(args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    times: list[float] = []
    loss = float("nan")
    for epoch in range(args.epochs + 1):  # epoch 0 is the warm-up
        sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        last = None
        for i in range(steps):
            last = step(x_all.index_select(0, perm[i * b : (i + 1) * b]))
        loss = float(last.item()) if last is not None else float("nan")  # also a device sync
        sync(device)
        dt = time.perf_counter() - t0
        log(f"bare loop epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: {dt:.2f} s, last batch loss {loss:.2f}")
        if epoch > 0:
            times.append(dt)
    return {
        "bare_loop_s_per_epoch": median(times),
        "bare_loop_epoch_s": times,
        "bare_loop_last_loss": loss,
        "steps_per_epoch": steps,
    }


# --------------------------------------------------------------- reference loader


def torchvision_root(data_dir: Path) -> Path:
    """A folder torchvision's MNIST accepts (``root/MNIST/raw/`` with the four uncompressed
    files), made once under /tmp and keyed by the data dir and its files' sizes and times.
    Nothing is ever written into the data dir or the repository."""
    sources = {}
    for split in vdata.FILES.values():
        for name in split[:2]:
            sources[name] = vdata.find_idx_file(data_dir, name)
    key = hashlib.sha256(
        "\n".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources.values()).encode()
    ).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"vae_dist_bench_torchvision_{key}"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dest = raw / name
        if dest.is_file():
            continue
        tmp = raw / f".{name}.{os.getpid()}.tmp"
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dest)  # atomic: a cached file is always whole
    return root


def measure_reference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    root = torchvision_root(Path(args.data_dir))
    dataset = datasets.MNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
    torch.manual_seed(args.seed)  # the DataLoader's shuffle draws from the global RNG
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    step = BareStep(args, device, usual_adam=args.reference_adam == "usual")
    steps_per_epoch = len(loader)

    def batches(limit: Optional[int]) -> Iterator[torch.Tensor]:
        for i, (x, _) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            yield x.to(device)

    def timed(limit: Optional[int]) -> tuple[float, int]:
        sync(device)
        t0 = time.perf_counter()
        last, count = None, 0
        for x in batches(limit):
            last = step(x)
            count += 1
        if last is not None:
            last.item()
        sync(device)
        return time.perf_counter() - t0, count

    warm_s, warm_n = timed(min(REFERENCE_WARMUP_STEPS, steps_per_epoch))
    log(f"reference loader warm-up: {warm_n} steps in {warm_s:.2f} s")
    times: list[float] = []
    limit = args.reference_batches or None
    for epoch in range(args.reference_epochs):
        dt, count = timed(limit)
        scaled = dt * steps_per_epoch / count
        log(
            f"reference loader epoch {epoch + 1}: {count} batches in {dt:.2f} s"
            + (f" -> {scaled:.2f} s per {steps_per_epoch}-batch epoch" if count != steps_per_epoch else "")
        )
        times.append(scaled)
    if limit is None or limit >= steps_per_epoch:
        method = (
            f"median of {args.reference_epochs} full epoch(s) ({steps_per_epoch} batches, the last one partial) "
            f"after a {warm_n}-step warm-up"
        )
    else:
        method = (
            f"median of {args.reference_epochs} timing(s) of the first {limit} batches of an epoch (worker start-up "
            f"included), scaled to {steps_per_epoch} batches, after a {warm_n}-step warm-up"
        )
    return {"reference_loader_s_per_epoch": median(times), "reference_epoch_s": times, "reference_method": method}


# ------------------------------------------------------------------------- modes


def check_targets(result: dict[str, Any], device: torch.device) -> dict[str, Optional[bool]]:
    """Which README targets this run meets (None where a figure is missing or the target
    does not apply)."""

    def at_most(v: Optional[float], limit: float) -> Optional[bool]:
        return None if v is None else v <= limit

    def at_least(v: Optional[float], limit: float) -> Optional[bool]:
        return None if v is None else v >= limit

    checks: dict[str, Optional[bool]] = {
        f"valid_fraction < {MAX_VALID_FRACTION:g}": None
        if result.get("valid_fraction") is None
        else result["valid_fraction"] < MAX_VALID_FRACTION
    }
    if device.type == "cpu":
        checks[f"trainer_over_bare <= {CPU_MAX_TRAINER_OVER_BARE:g}"] = at_most(
            result.get("trainer_over_bare"), CPU_MAX_TRAINER_OVER_BARE
        )
        checks[f"reference_over_trainer >= {CPU_MIN_REFERENCE_OVER_TRAINER:g}"] = at_least(
            result.get("reference_over_trainer"), CPU_MIN_REFERENCE_OVER_TRAINER
        )
    else:
        if result.get("model") == "mlp":
            checks[f"mlp epoch < {GPU_MAX_MLP_EPOCH_S:g} s (H100)"] = (
                None if result.get("trainer_s_per_epoch") is None else result["trainer_s_per_epoch"] < GPU_MAX_MLP_EPOCH_S
            )
        checks[f"reference_over_trainer >= {GPU_MIN_REFERENCE_OVER_TRAINER:g}"] = at_least(
            result.get("reference_over_trainer"), GPU_MIN_REFERENCE_OVER_TRAINER
        )
    return checks


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every result records."""
    return dict(
        model=args.model,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_workers=args.num_workers,
        compile=args.compile,
        fused_adam=args.fused_adam,
        flush_denormal=args.flush_denormal,
        reference_adam=args.reference_adam,
        mixed_precision=args.mixed_precision,
        data_dir=str(args.data_dir),
    )


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    other = OtherLoad()
    device = resolve_device(args.device)
    result: dict[str, Any] = {"mode": "throughput", **environment(device)}
    result.update(**run_settings(args), epochs=args.epochs)
    images = vdata.load_split(args.data_dir, "train").images
    result["train_samples"] = int(images.shape[0])

    log(f"[1/3] bare loop: {args.epochs} timed epoch(s) after 1 warm-up epoch on {device}")
    result.update(measure_bare(args, device, images))
    del images

    log(f"[2/3] trainer: vae_dist.train.train, {args.epochs} epoch(s), epoch 1 counted as warm-up")
    result.update(measure_trainer(args))

    if args.skip_reference:
        log("[3/3] reference loader: skipped")
        result.update(reference_loader_s_per_epoch=None, reference_epoch_s=[], reference_method="skipped")
    else:
        log(f"[3/3] reference loader: torchvision MNIST + ToTensor + DataLoader(num_workers={args.num_workers})")
        result.update(measure_reference(args, device))

    result["trainer_over_bare"] = ratio(result["trainer_s_per_epoch"], result["bare_loop_s_per_epoch"])
    result["reference_over_trainer"] = ratio(result["reference_loader_s_per_epoch"], result["trainer_s_per_epoch"])
    t = result["trainer_s_per_epoch"]
    result["trainer_samples_per_s"] = result["steps_per_epoch"] * args.batch_size / t if t else None
    result["targets"] = check_targets(result, device)
    result["load_avg_1m_at_end"] = _load_avg()
    result["other_cpu_cores"] = other.cores()
    return result


def time_to_quality(
    args: argparse.Namespace, target: float = 106.0, max_epochs: int = 10
) -> dict[str, Any]:
    """Train through the trainer (bce reconstruction) for up to ``max_epochs`` and report
    the first epoch whose valid/loss <= target, with the wall time spent training and
    validating until then (the sum of epoch_seconds; set-up and checkpoints excluded)."""
    other = OtherLoad()
    device = resolve_device(args.device)
    result: dict[str, Any] = {"mode": "time_to_quality", **environment(device)}
    result.update(
        **run_settings(args), recon_loss="bce", seed=args.seed, target_valid_loss=target, max_epochs=max_epochs
    )
    log(f"time to quality: training up to {max_epochs} epoch(s) until valid/loss <= {target:g}")
    with tempfile.TemporaryDirectory(prefix="vae_dist_bench_ttq_") as tmp:
        rows, wall = run_trainer(trainer_config(args, Path(tmp) / "run", epochs=max_epochs, recon_loss="bce"))
    elapsed, reached_epoch, reached_s = 0.0, None, None
    for row in rows:
        elapsed += row["epoch_seconds"]
        if reached_epoch is None and row["valid/loss"] <= target:
            reached_epoch, reached_s = row["epoch"], elapsed
    result.update(
        reached=reached_epoch is not None,
        epoch=reached_epoch,
        wall_s=reached_s,
        valid_loss_by_epoch=[row["valid/loss"] for row in rows],
        epoch_seconds=[row["epoch_seconds"] for row in rows],
        trainer_wall_s=wall,
        load_avg_1m_at_end=_load_avg(),
        other_cpu_cores=other.cores(),
    )
    return result


# ------------------------------------------------------------------------ output


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if abs(v) < 100 else f"{v:,.1f}{unit}"
    return f"{v}{unit}"


def render(result: dict[str, Any]) -> str:
    lines = [
        f"device      {result['device']} ({result['device_type']}, {result['threads']} torch threads)",
        f"versions    torch {result['torch']}, accelerate {result['accelerate']}, torchvision {result['torchvision']}",
        f"date        {result['date']}; 1-min load average {_fmt(result['load_avg_1m_at_start'])} at start, "
        f"{_fmt(result.get('load_avg_1m_at_end'))} at end; other processes used "
        f"{_fmt(result.get('other_cpu_cores'))} cores during the run",
    ]
    if (result.get("other_cpu_cores") or 0.0) > MAX_OTHER_CORES:
        lines.append("WARNING     other processes shared the CPU during the run: figures are noisy")
    if result["mode"] == "time_to_quality":
        lines += [
            f"setup       {result['model']} VAE, bce, batch {result['batch_size']}, lr {result['learning_rate']:g}, "
            f"compile {result['compile']}, fused Adam {result['fused_adam']}, precision {result['mixed_precision']}, "
            f"flush denormals {result['flush_denormal']}",
            f"target      valid/loss <= {result['target_valid_loss']:g} within {result['max_epochs']} epoch(s)",
            "valid/loss  " + ", ".join(f"{v:.2f}" for v in result["valid_loss_by_epoch"]),
        ]
        if result["reached"]:
            lines.append(f"reached     at epoch {result['epoch']} after {result['wall_s']:.2f} s (sum of epoch_seconds)")
        else:
            lines.append("reached     NO (not within the epochs run)")
        return "\n".join(lines)
    lines += [
        f"setup       {result['model']} VAE, batch {result['batch_size']}, lr {result['learning_rate']:g}, "
        f"{result['train_samples']} images, {result['steps_per_epoch']} steps/epoch, workers {result['num_workers']}, "
        f"compile {result['compile']}, fused Adam {result['fused_adam']}, precision {result['mixed_precision']}, "
        f"flush denormals {result['flush_denormal']}, reference Adam {result['reference_adam']}",
        "",
        f"{'figure':<32} {'value':>12}  per-epoch values",
        f"{'-' * 32} {'-' * 12}  {'-' * 30}",
    ]

    def row(name: str, value: Any, unit: str = "", values: Optional[list[float]] = None) -> None:
        extra = ", ".join(f"{v:.2f}" for v in values) if values else ""
        lines.append(f"{name:<32} {_fmt(value, unit):>12}  {extra}")

    row("trainer_s_per_epoch", result["trainer_s_per_epoch"], " s", result["trainer_epoch_train_s"])
    row("valid_s", result["valid_s"], " s", result["trainer_epoch_valid_s"])
    row("valid_fraction", result["valid_fraction"])
    row("bare_loop_s_per_epoch", result["bare_loop_s_per_epoch"], " s", result["bare_loop_epoch_s"])
    row("reference_loader_s_per_epoch", result["reference_loader_s_per_epoch"], " s", result["reference_epoch_s"])
    row("trainer_over_bare", result["trainer_over_bare"], "x")
    row("reference_over_trainer", result["reference_over_trainer"], "x")
    row("trainer_samples_per_s", result["trainer_samples_per_s"])
    row("trainer_wall_s (whole train())", result["trainer_wall_s"], " s")
    lines += ["", "trainer: median of epochs 2.. (epoch 1 is warm-up); bare loop: median after 1 warm-up epoch"]
    lines.append(f"reference: {result['reference_method']}")
    lines += ["", "targets:"] + [f"  {name:<40} {_fmt(ok)}" for name, ok in result["targets"].items()]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds per epoch of the vae_dist trainer, a bare training loop and the usual per-sample loader.",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="folder of the four MNIST IDX files (default: "
                   "$VAE_DIST_DATA_DIR or ../shared/mnist)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=3, help="trainer epochs (the first is warm-up) and timed bare-loop "
                   "epochs (after one warm-up epoch)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the trainer and the reference "
                   "loader (the trainer uses 0 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (trainer: compile=True)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True, help="the trainer's "
                   "optimizer.fused, in the trainer and the floor (default: on, as in the trainer)")
    p.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True, help="the trainer's "
                   "flush_denormal, set once at start for all three measurements (default: on, as in the trainer)")
    p.add_argument("--reference-adam", choices=["usual", "trainer"], default="usual", help="the reference's optimizer: "
                   "usual = the canonical example's torch.optim.Adam (default); trainer = the trainer's, so that "
                   "only the loader differs")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's "
                   "choice, usually the number of cores)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-every-steps", type=int, default=50, help="the trainer's logging interval (its default)")
    p.add_argument("--reference-epochs", type=int, default=2, help="timed reference-loader epochs")
    p.add_argument("--reference-batches", type=int, default=0, help="time only this many batches per reference "
                   "epoch and scale to the epoch (0 = full epochs)")
    p.add_argument("--skip-reference", action="store_true", help="do not measure the reference loader")
    p.add_argument("--time-to-quality", type=float, nargs="?", const=106.0, default=None, metavar="TARGET",
                   help="instead: train (mlp-style flags, bce) and report when valid/loss first reaches TARGET "
                   "(default 106)")
    p.add_argument("--max-epochs", type=int, default=10, help="epoch limit for --time-to-quality")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = p.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = vdata.default_data_dir()
    if args.time_to_quality is None and args.epochs < 2:
        p.error("--epochs must be >= 2 (the trainer's first epoch is warm-up)")
    for name in ("batch_size", "reference_epochs", "max_epochs", "log_every_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.num_workers < 0 or args.reference_batches < 0:
        p.error("--num-workers and --reference-batches must be >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # The trainer's process settings (vae_dist.runtime), first, and for all three loops.
    prepare_process(args.flush_denormal)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    json_out = None
    if args.json:
        # Keep stdout for the one JSON object: anything else (including output written
        # straight to file descriptor 1 by libraries) goes to stderr meanwhile.
        sys.stdout.flush()
        json_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    try:
        if args.time_to_quality is not None:
            result = time_to_quality(args, args.time_to_quality, args.max_epochs)
        else:
            result = throughput(args)
    except VaeDistError as e:
        log(f"error: {e}")
        return 2
    finally:
        sys.stdout.flush()
    if json_out is not None:
        json_out.write(json.dumps(result, sort_keys=True) + "\n")
        json_out.flush()
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
