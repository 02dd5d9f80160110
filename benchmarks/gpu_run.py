"""The whole GPU check in one call: install, NCCL, the CUDA tests, the speed figures, time
to quality and the IW-NLL, each step bounded, the summary rewritten after every step.

    python3 benchmarks/gpu_run.py [--out DIR] [--budget-s 470] [--steps a,b] [--ttq-train-s S]
    python benchmarks/gpu_run.py --dry-run --out DIR      # the same steps on the CPU, tiny sizes

Writes DIR/summary.json (every step: status, seconds, figures; the targets) and
DIR/gpu_run.log (every command and its whole output); DIR is $OUT by default. A step that
fails or runs out of time leaves the others' figures in the summary. Only the standard
library is imported here: pydantic is not there until the install step has run.
The exact device command and the table to fill: benchmarks/README.md, "GPU run".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"  # pydantic and its needs, for the device's Python (benchmarks/README.md)
CARRIED_DATA = REPO / ".data" / "mnist"  # ../shared does not travel to the device
SITE = Path("/tmp/vae_dist_site")  # where the carried wheels are installed

# The targets.
MLP_EPOCH_S, DEEP_MLP_EPOCH_S = 0.25, 0.5
MAX_TRAINER_OVER_BARE, MIN_OVER_PER_SAMPLE = 1.10, 20.0
IW_NLL_TARGET, TTQ_TRAIN_S = 86.76, 300.0
# Seconds kept back for the IW-NLL step (k = 5000 on 10,000 images), and the set-up and
# export around the time-to-quality training.
IW_RESERVE_S, TTQ_OVERHEAD_S = 120.0, 25.0

# Step caps in seconds: a step gets min(cap, what is left of the budget).
CAPS = {"setup": 60, "nccl": 60, "cuda_tests": 150, "throughput_mlp": 70, "throughput_deep_mlp": 50,
        "throughput_mlp_graphs": 90, "canonical": 45, "time_to_quality": TTQ_TRAIN_S + TTQ_OVERHEAD_S,
        "iw_nll": 400}
STEPS = list(CAPS)

# The trainer's own defaults (the main job's recipe), over the benchmarks' canonical ones.
DEFAULT_RECIPE = ["--model", "deep-mlp", "--batch-size", "64", "--learning-rate", "2e-3", "--lr-schedule", "cosine",
                  "--kl-warmup-epochs", "2"]
TINY = ["--limit-train-samples", "256", "--limit-eval-samples", "100", "--batch-size", "64"]


class Runner:
    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget_s
        self.log_path, self.summary_path = out / "gpu_run.log", out / "summary.json"
        # The time-to-quality run's folder: outside OUT, of which at most 8 files come back.
        self.ttq_run = Path(tempfile.mkdtemp(prefix="vae_dist_gpu_run_")) / "ttq_run"
        self.ttq_train_s = TTQ_TRAIN_S
        self.env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
        if CARRIED_DATA.is_dir():
            self.env["VAE_DIST_DATA_DIR"] = str(CARRIED_DATA)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        if dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
        self.summary: dict[str, Any] = {
            "dry_run": dry_run, "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s, "steps": {}, "targets": {},
        }
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def write(self) -> None:
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        os.replace(tmp, self.summary_path)

    def sh(self, cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None) -> tuple[Optional[int], str]:
        """Run cmd in its own process group, output to the log; (exit code or None on a
        timeout, stdout). The whole group is killed at the timeout (pytest's children too)."""
        self.log(f"\n$ {' '.join(cmd)}   (timeout {timeout:.0f} s)")
        with open(self.log_path, "a") as errf:
            p = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE, stderr=errf, text=True,
                                 start_new_session=True)
            try:
                stdout, _ = p.communicate(timeout=max(1.0, timeout))
                rc: Optional[int] = p.returncode
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                stdout, _ = p.communicate()
                rc = None
        self.log(stdout)
        return rc, stdout

    def step(self, name: str, fn: Callable[[float], dict[str, Any]]) -> None:
        """Run one step with min(its cap, the budget left); record status and figures."""
        timeout = min(CAPS[name], self.left() - 5)
        record: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "figures": {}}
        if timeout < 10:
            record["reason"] = "out of budget"
        else:
            t0 = time.monotonic()
            try:
                figures = fn(timeout)
                record.update(status=figures.pop("_status", "ok"), figures=figures)
            except StepFailed as e:
                record.update(status=e.status, reason=str(e), figures=e.figures)
            except Exception as e:  # a bug in this script must not cost the other steps
                record.update(status="failed", reason=f"{type(e).__name__}: {e}")
            record["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[gpu_run] {name}: {record['status']} in {record['seconds']} s {record.get('reason', '')}", flush=True)
        self.summary["steps"][name] = record
        self.write()

    def json_step(self, cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
        rc, stdout = self.sh(cmd, timeout, env)
        if rc is None:
            raise StepFailed("timeout", f"killed after {timeout:.0f} s")
        if rc != 0:
            raise StepFailed("failed", f"exit {rc} (see gpu_run.log)")
        return json.loads(stdout.strip().splitlines()[-1])


class StepFailed(Exception):
    def __init__(self, status: str, reason: str, figures: Optional[dict[str, Any]] = None):
        super().__init__(reason)
        self.status, self.figures = status, figures or {}


def _version(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("+")[0].split("."))


def setup(r: Runner, timeout: float) -> dict[str, Any]:
    """Install the carried wheels a distribution the image lacks (or has older), into SITE."""
    from importlib import metadata

    figures: dict[str, Any] = {"python": sys.version.split()[0], "data_dir": r.env.get("VAE_DIST_DATA_DIR")}
    install, present = [], {}
    for wheel in sorted(WHEELS.glob("*.whl")):
        dist, version = wheel.name.split("-")[:2]
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and _version(have) >= _version(version):
            present[dist] = have
        else:
            install.append(wheel)
    figures.update(installed=[w.name for w in install], image_has=present)
    if r.dry_run:
        figures["_status"] = "ok (dry run: nothing installed)"
    elif install:
        rc, _ = r.sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                      "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, install)], timeout)
        if rc != 0:
            raise StepFailed("failed", f"pip install exit {rc}", figures)
        r.env["PYTHONPATH"] = os.pathsep.join([str(SITE), r.env["PYTHONPATH"]])
    probe = ("import json, torch, pydantic, accelerate; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
             "'pydantic': pydantic.VERSION, 'accelerate': accelerate.__version__}))")
    figures.update(r.json_step([sys.executable, "-c", probe], timeout))
    if shutil.which("nvidia-smi") and not r.dry_run:
        _, smi = r.sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm", "--format=csv,noheader"], 20)
        figures["nvidia_smi"] = smi.strip()
    return figures


NCCL_CHECK = """
import json, os, sys, time, torch, torch.distributed as dist
backend = sys.argv[1]
t0 = time.perf_counter()
dist.init_process_group(backend, init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
t = torch.arange(4.0, device=device)
dist.all_reduce(t)
ok = t.tolist() == [0.0, 1.0, 2.0, 3.0]
dist.destroy_process_group()
print(json.dumps({"backend": backend, "all_reduce_ok": ok, "init_and_reduce_s": time.perf_counter() - t0}))
"""


def nccl(r: Runner, timeout: float) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return r.json_step([sys.executable, "-c", NCCL_CHECK, "gloo" if r.dry_run else "nccl", str(port)], timeout)


def cuda_tests(r: Runner, timeout: float) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    junit = r.out / "cuda_tests.xml"
    rc, stdout = r.sh([sys.executable, "-m", "pytest", "-v", "tests/test_cuda.py", "-p", "no:cacheprovider", "-rfEs",
                       "--durations=0", f"--junitxml={junit}"], timeout)
    figures: dict[str, Any] = {}
    if not junit.exists():  # killed before pytest wrote it: the outcomes its -v lines gave so far
        for m in re.finditer(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", stdout, re.M):
            figures.setdefault("tests", {})[m.group(1)] = {"outcome": m.group(2).lower(), "s": None}
    else:
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        cases = suite.findall("testcase") if suite is not None else []
        for case in cases:
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    figures.setdefault("why", {})[case.get("name")] = (el.get("message") or "")[:300]
            figures.setdefault("tests", {})[case.get("name")] = {"outcome": outcome, "s": float(case.get("time") or 0)}
    figures["counts"] = {o: sum(1 for t in figures.get("tests", {}).values() if t["outcome"] == o)
                         for o in ("passed", "failed", "error", "skipped")}
    if rc is None:
        raise StepFailed("timeout", f"killed after {timeout:.0f} s", figures)
    if rc not in (0, 5) or not figures.get("tests"):
        raise StepFailed("failed", f"pytest exit {rc}", figures)
    return figures


KEEP = ("device", "torch", "date", "model", "batch_size", "compile", "mixed_precision", "trainer_s_per_epoch",
        "bare_loop_s_per_epoch", "reference_loader_s_per_epoch", "trainer_over_bare", "reference_over_trainer",
        "valid_s", "valid_fraction", "trainer_wall_s", "trainer_samples_per_s", "trainer_epoch_train_s",
        "bare_loop_epoch_s", "steps_per_epoch", "epochs", "targets", "trainer_final_valid_loss")


def throughput(r: Runner, timeout: float, flags: list[str], env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    device = ["--device", "cpu", *TINY, "--epochs", "2"] if r.dry_run else ["--device", "cuda"]
    out = r.json_step([sys.executable, "benchmarks/throughput.py", *flags, *device, "--json"], timeout, env)
    return {k: out.get(k) for k in KEEP}


def canonical(r: Runner, timeout: float) -> dict[str, Any]:
    tiny = ["--limit-train-samples", "256"] if r.dry_run else []
    out = r.json_step([sys.executable, "benchmarks/canonical.py", "--epochs", "1", *tiny, "--json"], timeout)
    return {k: out.get(k) for k in ("wall_s", "final_test_loss", "device", "torch", "threads")}


def time_to_quality(r: Runner, timeout: float) -> dict[str, Any]:
    """The binarized recipe (quality.py's: the default deep-mlp on dynamic binarization),
    for as many epochs as the training time allows, at the measured epoch time."""
    run = r.ttq_run
    train_s = min(r.ttq_train_s, timeout - TTQ_OVERHEAD_S, r.left() - IW_RESERVE_S - TTQ_OVERHEAD_S)
    deep = r.summary["steps"].get("throughput_deep_mlp", {}).get("figures", {})
    if deep.get("trainer_wall_s") and deep.get("epochs"):
        per_epoch = 1.3 * deep["trainer_wall_s"] / deep["epochs"]  # the coins and the per-epoch saves on top
    else:
        per_epoch = 1.0
    epochs = 2 if r.dry_run else int(train_s // per_epoch)
    if epochs < 1:
        raise StepFailed("skipped", f"{train_s:.0f} s of training left: less than an epoch")
    tiny = TINY if r.dry_run else []
    args = ["train", "--binarize", "dynamic", "--epochs", str(epochs), "--artifact-dir", str(run), "--num-workers", "0",
            "--wandb-mode", "disabled", *(["--cpu"] if r.dry_run else []), *tiny]
    if "VAE_DIST_DATA_DIR" in r.env:
        args += ["--data-dir", r.env["VAE_DIST_DATA_DIR"]]
    t0 = time.monotonic()
    rc, _ = r.sh([sys.executable, "-m", "vae_dist", *args], timeout)
    wall = time.monotonic() - t0
    figures: dict[str, Any] = {"epochs_planned": epochs, "est_epoch_wall_s": per_epoch, "train_budget_s": train_s,
                               "wall_s": wall, "curve": []}
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        elapsed = 0.0
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            elapsed += row["epoch_seconds"]
            figures["curve"].append({"epoch": row["epoch"], "valid_loss": row["valid/loss"],
                                     "epoch_s": row["epoch_seconds"], "elapsed_s": round(elapsed, 2)})
        figures["train_s"] = elapsed
        figures["final_valid_loss"] = figures["curve"][-1]["valid_loss"] if figures["curve"] else None
        shutil.copy(metrics, r.out / "ttq_metrics.jsonl")
    if rc is None:
        raise StepFailed("timeout", f"killed after {timeout:.0f} s", figures)
    if rc != 0:
        raise StepFailed("failed", f"exit {rc}", figures)
    return figures


def iw_nll(r: Runner, timeout: float) -> dict[str, Any]:
    run = r.ttq_run
    if not (run / "model.safetensors").exists():
        raise StepFailed("skipped", "no model from the time-to-quality step")
    k = ["--iw-samples", "5", "--limit-eval-samples", "100"] if r.dry_run else ["--iw-samples", "5000"]
    data = ["--data-dir", r.env["VAE_DIST_DATA_DIR"]] if "VAE_DIST_DATA_DIR" in r.env else []
    out = r.json_step([sys.executable, "-m", "vae_dist", "evaluate", str(run), "--json", *k, *data], timeout)
    return {k: out.get(k) for k in ("iw_nll", "iw_samples", "loss", "samples", "protocol")}


def targets(s: dict[str, Any]) -> dict[str, Optional[bool]]:
    def fig(step: str, key: str) -> Any:
        return s["steps"].get(step, {}).get("figures", {}).get(key)

    def check(v: Any, ok: Callable[[Any], bool]) -> Optional[bool]:
        return None if v is None else bool(ok(v))

    mlp = fig("throughput_mlp", "trainer_s_per_epoch")
    graphs = fig("throughput_mlp_graphs", "trainer_s_per_epoch")
    canon = fig("canonical", "wall_s")
    ttq_s = fig("time_to_quality", "train_s")
    counts = fig("cuda_tests", "counts")
    return {
        f"mlp epoch < {MLP_EPOCH_S} s": check(mlp, lambda v: v < MLP_EPOCH_S),
        f"mlp epoch < {MLP_EPOCH_S} s, compiled with CUDA graphs": check(graphs, lambda v: v < MLP_EPOCH_S),
        f"deep-mlp epoch < {DEEP_MLP_EPOCH_S} s": check(fig("throughput_deep_mlp", "trainer_s_per_epoch"),
                                                        lambda v: v < DEEP_MLP_EPOCH_S),
        f"trainer_over_bare <= {MAX_TRAINER_OVER_BARE}": check(fig("throughput_mlp", "trainer_over_bare"),
                                                                lambda v: v <= MAX_TRAINER_OVER_BARE),
        f"per-sample loader on the device / trainer >= {MIN_OVER_PER_SAMPLE:g}": check(
            fig("throughput_mlp", "reference_over_trainer"), lambda v: v >= MIN_OVER_PER_SAMPLE),
        f"canonical.py epoch / trainer epoch >= {MIN_OVER_PER_SAMPLE:g}": check(
            canon / mlp if canon and mlp else None, lambda v: v >= MIN_OVER_PER_SAMPLE),
        f"IW-NLL (k = 5000) <= {IW_NLL_TARGET} within {TTQ_TRAIN_S:g} s of training": check(
            fig("iw_nll", "iw_nll"), lambda v: v <= IW_NLL_TARGET and (ttq_s or 0) <= TTQ_TRAIN_S),
        "CUDA tests all pass": check(counts, lambda c: c["passed"] > 0 and not c["failed"] and not c["error"]),
        "NCCL init and all-reduce, 1 process": check(fig("nccl", "all_reduce_ok"), bool),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="folder for summary.json and gpu_run.log (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes, no install")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall seconds for all the steps together")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--ttq-train-s", type=float, default=TTQ_TRAIN_S, help="most seconds of time-to-quality training")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("give --out DIR (or set OUT)")
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(STEPS)):
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    r = Runner(args.out, args.dry_run, args.budget_s)
    r.ttq_train_s = args.ttq_train_s
    graphs_env = dict(r.env, ACCELERATE_DYNAMO_MODE="reduce-overhead")  # the trainer's and the bare loop's compile mode
    actions: dict[str, Callable[[float], dict[str, Any]]] = {
        "setup": lambda t: setup(r, t),
        "nccl": lambda t: nccl(r, t),
        "cuda_tests": lambda t: cuda_tests(r, t),
        "throughput_mlp": lambda t: throughput(r, t, ["--epochs", "6", "--reference-epochs", "1",
                                                      "--reference-batches", "100"]),
        "throughput_deep_mlp": lambda t: throughput(r, t, [*DEFAULT_RECIPE, "--epochs", "4", "--skip-reference"]),
        "throughput_mlp_graphs": lambda t: throughput(
            r, t, [*([] if args.dry_run else ["--compile"]), "--epochs", "4", "--skip-reference"], graphs_env),
        "canonical": lambda t: canonical(r, t),
        "time_to_quality": lambda t: time_to_quality(r, t),
        "iw_nll": lambda t: iw_nll(r, t),
    }
    for name in STEPS:
        if name in chosen:
            r.step(name, actions[name])
            if name == "setup" and r.summary["steps"]["setup"]["status"] == "failed":
                break  # nothing else can run without the packages
    shutil.rmtree(r.ttq_run.parent, ignore_errors=True)  # the folder this script made
    r.summary["targets"] = targets(r.summary)
    r.summary["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    r.write()
    print("\nstep                    status      seconds")
    for name, rec in r.summary["steps"].items():
        print(f"{name:<23} {rec['status']:<11} {rec['seconds']:>7}")
    print("\ntargets" + (" (dry run: CPU figures of tiny runs; the targets say nothing)" if args.dry_run else ""))
    for name, ok in r.summary["targets"].items():
        print(f"  {name:<66} {'-' if ok is None else 'yes' if ok else 'NO'}")
    print(f"\nsummary: {r.summary_path}  log: {r.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
