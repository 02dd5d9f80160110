"""Time to quality: train through the vae_dist trainer and report when valid/loss first
reaches a target, in wall time and epochs, with the per-epoch curve.

The config is built from train flags as ``python -m vae_dist train`` builds it; --epochs
is the most epochs tried. wall_s is the sum of metrics.jsonl's epoch_seconds (training and
validation) up to and including the first epoch at or under the target: set-up,
checkpoints and previews are not counted (trainer_wall_s is the whole train() call).

See benchmarks/README.md for the commands and the measured figures.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import common
from common import log

# Default target (nats per test image): about where the canonical PyTorch VAE example ends its
# 10 epochs on this data (benchmarks/README.md has the measured curve).
DEFAULT_TARGET = 106.0


def curve(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The per-epoch curve and the first epoch at or under ``target``."""
    points, elapsed, reached = [], 0.0, None
    for row in rows:
        elapsed += row["epoch_seconds"]
        points.append({"epoch": row["epoch"], "valid_loss": row["valid/loss"], "train_loss": row["train/loss"],
                       "epoch_seconds": row["epoch_seconds"], "elapsed_s": elapsed})
        if reached is None and row["valid/loss"] <= target:
            reached = points[-1]
    return {
        "reached": reached is not None,
        "epoch": reached["epoch"] if reached else None,
        "wall_s": reached["elapsed_s"] if reached else None,
        "final_valid_loss": rows[-1]["valid/loss"] if rows else None,
        "curve": points,
    }


def render(r: dict[str, Any]) -> str:
    lines = common.render_header(r) + [
        f"target      valid/loss <= {r['target_valid_loss']:g} within {r['epochs']} epoch(s)",
        f"{'epoch':>5} {'valid/loss':>11} {'train/loss':>11} {'epoch s':>8} {'elapsed s':>10}",
    ]
    for p in r["curve"]:
        lines.append(f"{p['epoch']:>5} {p['valid_loss']:>11.2f} {p['train_loss']:>11.2f} "
                     f"{p['epoch_seconds']:>8.2f} {p['elapsed_s']:>10.2f}")
    if r["reached"]:
        lines.append(f"reached     at epoch {r['epoch']} after {r['wall_s']:.2f} s (sum of epoch_seconds)")
    else:
        lines.append("reached     NO (not within the epochs run)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.bench_parser("Wall time and epochs until the trainer's valid/loss first reaches a target.")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET, help="valid/loss (nats per test image) to reach")
    with tempfile.TemporaryDirectory(prefix="vae_dist_bench_ttq_") as tmp:
        args, config, train_args = common.parse(p, argv, [*common.DEFAULT_TRAIN_ARGS, "--epochs", "10"], Path(tmp) / "run")
        return common.main_wrapper(lambda: run(args, config, train_args))


def run(args, config, train_args) -> int:
    from vae_dist.training.runtime import prepare_process

    prepare_process(config.flush_denormal)  # as the CLI does: before any tensor work
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    other, device = common.OtherLoad(), common.resolve_device(args.device)
    with common.json_stdout(args.json) as emit:
        r: dict[str, Any] = {"mode": "time_to_quality", **common.environment(device), **common.settings(config, train_args)}
        r["target_valid_loss"] = args.target
        log(f"time to quality: training up to {config.epochs} epoch(s) until valid/loss <= {args.target:g}")
        rows, wall = common.run_trainer(config)
        r.update(curve(rows, args.target), trainer_wall_s=wall, load_avg_1m_at_end=common.load_avg(),
                 other_cpu_cores=other.cores())
        emit(r)
    if not args.json:
        print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
