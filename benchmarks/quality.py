"""Model quality per recipe: train one recipe through the trainer, then score the model the
way the literature does, so each row of the README's results table reproduces with one
command:

    python benchmarks/quality.py --recipe NAME [--iw-samples K] [--iw-images N] [--device cuda] [--json] [train flags]
    python benchmarks/quality.py --list

A recipe is a config file, configs/NAME.yaml (any train flag given here overrides it). The
score is the test -ELBO over the whole test split and the importance-weighted NLL with K
samples (``evaluate --iw-samples K``) over the first N test images (all by default; K =
5000 over all 10,000 is hours on a CPU), each with the protocol it was measured on.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import common
from common import log

BASE = ["--wandb-mode", "disabled", "--num-workers", "0"]
# Each recipe's settings are configs/NAME.yaml (the README's recipes, one source for both).
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES: dict[str, str] = {
    "default": "the main job: deep-mlp GELU, cosine lr 2e-3, KL warm-up, grey-level",
    "canonical-model": "the PyTorch example's model and optimizer in this trainer, grey-level",
    "burn-original": "the original Burn flow's conv VAE and optimizer, grey-level",
    "binarized": "the ReLU deep-mlp (the default until GELU) on dynamically binarized MNIST",
    "best-grey": "the best grey-level recipe found in the canonical's CPU time: deep-mlp SiLU, KL warm-up over 3 epochs, "
                 "Adam 3e-3, 12 bf16 epochs",
    "best-binarized": "the best binarized recipe found in the canonical's CPU time: deep-mlp SiLU, KL warm-up over 8 "
                      "epochs, Adam 3e-3, 12 bf16 epochs",
    "burda-vae": "Burda et al.'s one-layer model, ELBO, this trainer's schedule",
    "burda-iwae": "Burda et al.'s one-layer model trained on the IWAE bound with k = 5",
    "burda2-vae": "Burda et al.'s two-stochastic-layer model, ELBO, the paper's optimizer and schedule",
    "burda2-iwae": "Burda et al.'s two-stochastic-layer model, IWAE bound (k = 50), the paper's optimizer and schedule",
    "vq-vae": "the VQ-VAE (codebook 128 x 16, a 7x7 grid of codes), grey-level; no likelihood bound",
    "vq-vae-binarized": "the VQ-VAE on dynamically binarized MNIST; no likelihood bound",
}


def recipe_file(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def recipe_flags(name: str) -> list[str]:
    """The recipe's settings as the train flags they stand for (what --list shows)."""
    from vae_dist.config import options, read_config_file

    given = read_config_file(recipe_file(name))
    flags = []
    for o in options():
        tree: object = given
        for part in o.dotted.split("."):
            tree = tree.get(part, None) if isinstance(tree, dict) else None
        if tree is not None:
            flags += [o.flag, ",".join(map(str, tree)) if isinstance(tree, list) else str(tree)]
    return flags


def main(argv: Optional[list[str]] = None) -> int:
    p = common.bench_parser("Train one recipe and score it: test -ELBO and importance-weighted NLL.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--iw-samples", type=int, default=1000, help="K of the importance-weighted NLL (0: skip it)")
    p.add_argument("--iw-images", type=int, default=0, help="the IW-NLL over the first N test images (0: all)")
    p.add_argument("--list", action="store_true", help="print the recipes and their flags")
    known, _ = p.parse_known_args(argv)
    if known.iw_images < 0:
        p.error("--iw-images must be >= 0")
    if known.list:
        for name, about in RECIPES.items():
            print(f"{name:16} configs/{name}.yaml: {' '.join(recipe_flags(name)) or '(the defaults)'}\n{'':16} {about}")
        return 0
    with tempfile.TemporaryDirectory(prefix="vae_dist_bench_quality_") as tmp:
        # The file first: BASE's flags, then the user's, override it (parse keeps a user's --config).
        defaults = ["--config", str(recipe_file(known.recipe)), *BASE]
        args, config, train_args = common.parse(p, argv, defaults, Path(tmp) / "run")
        return common.main_wrapper(lambda: run(args, config, train_args))


def run(args, config, train_args) -> int:
    from vae_dist.training.runtime import prepare_process

    prepare_process(config.flush_denormal)  # as the CLI does: before any tensor work
    import torch

    from vae_dist.run.modelfile import load_model_file
    from vae_dist.evaluation.evaluate import score, test_split

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    with common.json_stdout(args.json) as emit:
        r: dict[str, Any] = {"mode": "quality", "recipe": args.recipe, **common.environment(device),
                             **common.settings(config, train_args)}
        log(f"quality: recipe {args.recipe}: {' '.join(train_args)}")
        rows, wall = common.run_trainer(config)
        model, saved = load_model_file(Path(config.artifact_dir))
        images = test_split(saved, None, None).images
        k = args.iw_samples if model.iw_nll is not None else 0  # a family without an IW-NLL: its test loss only
        scored = score(model, saved, images)
        if k:
            log(f"IW-NLL on the first {args.iw_images or images.shape[0]} test images, K = {k}")
        t0 = time.perf_counter()
        # The -ELBO over the same images too: the gap between the two bounds is read on one set of images.
        iw = score(model, saved, images[: args.iw_images or None], iw_samples=k) if k else {}
        r.update(
            trainer_wall_s=wall, train_s=sum(row["epoch_seconds"] for row in rows), epochs=len(rows),
            test_elbo=scored["loss"], test_recon=scored["recon"], iw_nll=iw.get("iw_nll"),
            iw_images_elbo=iw.get("loss"), score_s=time.perf_counter() - t0,
            protocol=scored["protocol"], iw_protocol=iw.get("protocol"),
            whole_set={key: v for key, v in scored.items()
                       if key.startswith("active_units") or key in ("codes_used", "perplexity")},  # per layer too
            curve=[{"epoch": row["epoch"], "valid_loss": row["valid/loss"]} for row in rows],
        )
        emit(r)
    if not args.json:
        print("\n".join(common.render_header(r)))
        print(f"recipe      {args.recipe}: {RECIPES[args.recipe]}")
        print(f"trained     {r['epochs']} epochs in {r['trainer_wall_s']:.1f} s (epochs alone {r['train_s']:.1f} s)")
        print(f"test loss   {r['test_elbo']:.2f} (the -ELBO for the Gaussian families), recon {r['test_recon']:.2f}")
        if r["iw_nll"] is not None:
            n = r["iw_protocol"]["test_images"]
            print(f"IW-NLL      {r['iw_nll']:.2f} (K = {k}, the first {n} test images, whose -ELBO is "
                  f"{r['iw_images_elbo']:.2f}; {r['score_s']:.0f} s)")
        print(f"test set    {r['whole_set']}")
        print(f"protocol    {r['protocol']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
