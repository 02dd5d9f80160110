"""Model quality per recipe: train one recipe through the trainer, then score the model the
way the literature does, so each row of the README's results table reproduces with one
command:

    python benchmarks/quality.py --recipe NAME [--iw-samples K] [--device cuda] [--json] [train flags]
    python benchmarks/quality.py --list

A recipe is a list of train flags (any further flag given here is added after them). The
score is the final test -ELBO as training logged it and the importance-weighted NLL with
K samples (``evaluate --iw-samples K``), with the protocol they were measured on.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import common
from common import log

BASE = ["--wandb-mode", "disabled", "--num-workers", "0", "--epochs", "10"]
LITERATURE = ["--binarize", "dynamic"]
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"flags": [], "about": "the main job: deep-mlp, cosine lr 2e-3, KL warm-up, grey-level"},
    "canonical-model": {
        "flags": ["--model", "mlp", "--batch-size", "128", "--learning-rate", "1e-3", "--lr-schedule", "constant",
                  "--kl-warmup-epochs", "0"],
        "about": "the PyTorch example's model and optimizer in this trainer, grey-level",
    },
    "burn-original": {
        "flags": ["--model", "conv", "--learning-rate", "1e-4", "--lr-schedule", "constant", "--kl-warmup-epochs", "0"],
        "about": "the original Burn flow's conv VAE and optimizer, grey-level",
    },
    "binarized": {"flags": LITERATURE, "about": "the default recipe on dynamically binarized MNIST"},
    "burda-vae": {
        "flags": [*LITERATURE, "--model", "burda"],
        "about": "Burda et al.'s one-layer model, ELBO, this trainer's schedule",
    },
    "burda-iwae": {
        "flags": [*LITERATURE, "--model", "burda", "--iw-train-samples", "5"],
        "about": "Burda et al.'s one-layer model trained on the IWAE bound with k = 5",
    },
}


def main(argv: Optional[list[str]] = None) -> int:
    p = common.bench_parser("Train one recipe and score it: test -ELBO and importance-weighted NLL.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--iw-samples", type=int, default=1000, help="K of the importance-weighted NLL (0: skip it)")
    p.add_argument("--list", action="store_true", help="print the recipes and their flags")
    known, _ = p.parse_known_args(argv)
    if known.list:
        for name, r in RECIPES.items():
            print(f"{name:16} {' '.join(r['flags']) or '(the defaults)'}\n{'':16} {r['about']}")
        return 0
    with tempfile.TemporaryDirectory(prefix="vae_dist_bench_quality_") as tmp:
        defaults = [*BASE, *RECIPES[known.recipe]["flags"]]
        args, config, train_args = common.parse(p, argv, defaults, Path(tmp) / "run")
        return common.main_wrapper(lambda: run(args, config, train_args))


def run(args, config, train_args) -> int:
    from vae_dist.runtime import prepare_process

    prepare_process(config.flush_denormal)  # as the CLI does: before any tensor work
    import torch

    from vae_dist.modelfile import load_model_file
    from vae_dist.evaluate import score, test_images

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    with common.json_stdout(args.json) as emit:
        r: dict[str, Any] = {"mode": "quality", "recipe": args.recipe, **common.environment(device),
                             **common.settings(config, train_args)}
        log(f"quality: recipe {args.recipe}: {' '.join(train_args)}")
        rows, wall = common.run_trainer(config)
        model, saved = load_model_file(Path(config.artifact_dir))
        images = test_images(saved, None, None)
        log(f"scoring on {images.shape[0]} test images, K = {args.iw_samples}")
        t0 = time.perf_counter()
        scored = score(model, saved, images, iw_samples=args.iw_samples)
        r.update(
            trainer_wall_s=wall, train_s=sum(row["epoch_seconds"] for row in rows), epochs=len(rows),
            test_elbo=scored["loss"], iw_nll=scored.get("iw_nll"), score_s=time.perf_counter() - t0,
            protocol=scored["protocol"], curve=[{"epoch": row["epoch"], "valid_loss": row["valid/loss"]} for row in rows],
        )
        emit(r)
    if not args.json:
        print("\n".join(common.render_header(r)))
        print(f"recipe      {args.recipe}: {RECIPES[args.recipe]['about']}")
        print(f"trained     {r['epochs']} epochs in {r['trainer_wall_s']:.1f} s (epochs alone {r['train_s']:.1f} s)")
        print(f"test -ELBO  {r['test_elbo']:.2f}")
        if r["iw_nll"] is not None:
            print(f"IW-NLL      {r['iw_nll']:.2f} (K = {args.iw_samples}, {r['score_s']:.0f} s)")
        print(f"protocol    {r['protocol']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
