"""What the benchmark scripts share: their command line (own options + the trainer's flags),
the environment record, timing helpers, the bare training step, torchvision's MNIST
folder, running the trainer, and output (one JSON object, or text).

The trainer's config is always built by ``vae_dist.cli.app.parse_train_args``, the parser of
``python -m vae_dist train``: a benchmark's defaults are train flags put before the
user's, so any train flag given on the benchmark's command line wins and means what it
means to the trainer.
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
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

os.environ.setdefault("WANDB_MODE", "disabled")  # never touch the network from a benchmark

import torch  # noqa: E402

from vae_dist.data import datasets  # noqa: E402
from vae_dist.run.folder import read_metrics  # noqa: E402
from vae_dist.cli.app import parse_train_args  # noqa: E402
from vae_dist.config import TrainingConfig  # noqa: E402
from vae_dist.errors import VaeDistError  # noqa: E402
from vae_dist.models import build  # noqa: E402
from vae_dist.training.trainer import make_optimizer  # noqa: E402

# The benchmarks' historical setting: the canonical PyTorch VAE example (mlp, batch 128,
# constant lr 1e-3, no KL warm-up), no loader workers, no W&B. --epochs is each script's own.
DEFAULT_TRAIN_ARGS = [
    "--model", "mlp", "--batch-size", "128", "--learning-rate", "1e-3", "--lr-schedule", "constant",
    "--kl-warmup-epochs", "0", "--num-workers", "0", "--wandb-mode", "disabled",
]
# Other processes using more than this many cores make the figures noisy.
MAX_OTHER_CORES = 0.25


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ command line


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; the rest of the command line is train flags."""
    p = argparse.ArgumentParser(
        description=description, allow_abbrev=False,  # no prefix of a train flag may be taken for ours
        epilog="Every other argument (or everything after --) is a flag of `python -m vae_dist train` "
        "(see its --help), e.g. --model conv --batch-size 64 --compile --mixed-precision bf16.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu adds --cpu to the train flags")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (all else on stderr)")
    return p


def parse(
    p: argparse.ArgumentParser, argv: Optional[list[str]], defaults: list[str], artifact_dir: Path
) -> tuple[argparse.Namespace, TrainingConfig, list[str]]:
    """(benchmark options, the trainer config, the train flags it came from). Train flags
    are: ``defaults`` (left out when the user gives ``--config``), the device's, a scratch
    ``--artifact-dir``, then the user's; a repeated flag's last value wins."""
    args, rest = p.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if any(a == "--config" or a.startswith("--config=") for a in rest):
        defaults = []  # flags override a config file: the file's settings, not the benchmark's, apply
    device = ["--cpu"] if args.device == "cpu" else ["--no-cpu"]
    train_args = [*defaults, *device, "--artifact-dir", str(artifact_dir), *rest]
    try:
        config = parse_train_args(train_args)
    except VaeDistError as e:
        p.error(str(e))
    except Exception as e:  # the trainer parser's usage errors (typer's own classes)
        if not hasattr(e, "format_message"):
            raise
        p.error(f"train flags: {e.format_message()}")
    if config.cpu != (args.device == "cpu"):
        p.error(f"--device {args.device} contradicts the train flag --{'' if config.cpu else 'no-'}cpu")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if config.data.data_dir is None:  # never download from a benchmark: the offline copy
        config = config.model_copy(update={"data": config.data.model_copy(update={"data_dir": str(datasets.default_data_dir())})})
    return args, config, train_args


def settings(config: TrainingConfig, train_args: list[str]) -> dict[str, Any]:
    """What every result records about the run: the main settings flat, and the whole config."""
    return {
        "model": config.model.kind, "batch_size": config.data.batch_size, "learning_rate": config.optimizer.learning_rate,
        "num_workers": config.data.num_workers, "compile": config.compile, "fused_adam": config.optimizer.fused,
        "flush_denormal": config.flush_denormal, "mixed_precision": config.mixed_precision or "no",
        "recon_loss": config.loss.recon_loss, "seed": config.seed, "data_dir": config.data.data_dir,
        "epochs": config.epochs, "train_args": train_args, "config": config.to_dict(),
    }


# ------------------------------------------------------------------ environment


def resolve_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda given but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def environment(device: torch.device) -> dict[str, Any]:
    import accelerate
    import torchvision

    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "accelerate": accelerate.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_avg_1m_at_start": load_avg(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_avg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


class OtherLoad:
    """CPU time other processes used while this run went on, in cores. The load average
    also counts this run's own threads, so it cannot tell a quiet machine from a busy one;
    /proc/stat's busy time minus this process's own (children included) can."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), _system_busy_s(), _own_cpu_s()

    def cores(self) -> Optional[float]:
        busy, wall = _system_busy_s(), time.monotonic() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None  # not Linux
        return round(max(0.0, (busy - self.busy0 - (_own_cpu_s() - self.own0)) / wall), 3)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------ loops


class BareStep:
    """One optimizer step with no framework: forward (the family's objective), backward, (clip), Adam;
    model, optimizer, loss, precision and compile as in ``config``. ``usual_adam``: the
    canonical example's ``torch.optim.Adam(params, lr)`` instead of the trainer's."""

    def __init__(self, config: TrainingConfig, device: torch.device, usual_adam: bool = False):
        torch.manual_seed(config.seed)
        self.device, self.loss = device, config.loss
        self.model = build(config).to(device)
        # The mode Accelerate compiles the trainer's model with (its ACCELERATE_DYNAMO_MODE,
        # e.g. reduce-overhead for CUDA graphs), so that the two loops compare like with like.
        mode = os.environ.get("ACCELERATE_DYNAMO_MODE") or None
        self.forward: Callable[..., Any] = torch.compile(self.model, mode=mode) if config.compile else self.model
        lr = config.optimizer.learning_rate
        self.optimizer = (
            torch.optim.Adam(self.model.parameters(), lr=lr) if usual_adam else make_optimizer(self.model, config.optimizer)
        )
        self.max_grad_norm = config.optimizer.max_grad_norm
        precision = config.mixed_precision or "no"
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast around the forward only, as Accelerate does; the loss runs in float32.
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            terms = self.forward(x, None, kl_weight=self.loss.kl_weight).terms  # noise None: the model draws its own
        loss = terms["loss"].mean()
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def torchvision_root(data_dir: Path) -> Path:
    """A folder torchvision's MNIST accepts (``root/MNIST/raw/`` with the four uncompressed
    files), made once under the temp dir and keyed by the data files' paths, sizes and times.
    Nothing is ever written into the data dir or the repository."""
    sources = {name: datasets.find_idx_files(data_dir, name)[0]
               for split in datasets.FILES.values() for name in split[:2]}
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
        with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dest)  # atomic: a cached file is always whole
    return root


def run_trainer(config: TrainingConfig) -> tuple[list[dict[str, Any]], float]:
    """Train through ``vae_dist.training.trainer.train`` (its stdout sent to stderr); returns the
    metrics.jsonl rows and the wall seconds of the whole train() call."""
    from vae_dist.training.trainer import train

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(config)
    return read_metrics(Path(config.artifact_dir).expanduser()), time.perf_counter() - t0


# ------------------------------------------------------------------ output


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if abs(v) < 100 else f"{v:,.1f}{unit}"
    return f"{v}{unit}"


def render_header(r: dict[str, Any]) -> list[str]:
    lines = [
        f"device      {r['device']} ({r['device_type']}, {r['threads']} torch threads)",
        f"versions    torch {r['torch']}, accelerate {r['accelerate']}, torchvision {r['torchvision']}",
        f"date        {r['date']}; 1-min load average {fmt(r['load_avg_1m_at_start'])} at start, "
        f"{fmt(r.get('load_avg_1m_at_end'))} at end; other processes used {fmt(r.get('other_cpu_cores'))} cores",
        f"setup       {r['model']} VAE, {r['recon_loss']}, batch {r['batch_size']}, lr {r['learning_rate']:g}, "
        f"workers {r['num_workers']}, compile {r['compile']}, fused Adam {r['fused_adam']}, "
        f"precision {r['mixed_precision']}, flush denormals {r['flush_denormal']}, seed {r['seed']}",
    ]
    if (r.get("other_cpu_cores") or 0.0) > MAX_OTHER_CORES:
        lines.append("WARNING     other processes shared the CPU during the run: figures are noisy")
    return lines


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yields ``emit(result)``. With ``enabled``, stdout is kept for the one JSON object:
    anything else, including what libraries write straight to file descriptor 1, goes to
    stderr meanwhile."""
    if not enabled:
        yield lambda result: None
        return
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield lambda result: (out.write(json.dumps(result, sort_keys=True) + "\n"), out.flush())
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        out.close()


def main_wrapper(run: Callable[[], int]) -> int:
    """Errors the user can fix (a wrong data dir, a batch larger than the data): one line, status 2."""
    try:
        return run()
    except VaeDistError as e:
        log(f"error: {e}")
        return 2
