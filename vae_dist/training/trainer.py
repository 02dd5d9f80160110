"""``train(config)``: the canonical Accelerate order, from a config to a saved model.

Trackers' packages -> Accelerator -> data -> every check that can fail (batch size, model
size, resume) -> seed -> model -> optimizer -> artifact directory (locked) -> Learner (which
prepares) -> its restore (--resume: the checkpoint's checks) -> config.json -> trackers ->
Learner.fit -> model.safetensors (and to W&B), loss curves and the summary. Nothing in the artifact
directory is created or deleted until everything that can be checked first has passed.
"""

from __future__ import annotations

import os
import time
import typing
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
# Imported before any process group exists: its functions take `group=group.WORLD` as a
# default argument, so imported later (DDP does) they would hold the group until the
# interpreter's teardown, whose gloo threads can then abort a finished rank.
import torch.distributed.nn  # noqa: F401
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

from vae_dist.data import keyed
from vae_dist.data import loaders
from vae_dist.evaluation import evaluate
from vae_dist.evaluation import images
from vae_dist.evaluation import inference
from vae_dist.data import datasets
from vae_dist.run import modelfile
from vae_dist.training import resources
from vae_dist.run import folder
from vae_dist.run.checkpoint import TMP_PREFIX, Checkpointer
from vae_dist.config import OptimizerConfig, TrainingConfig, resume_mismatch
from vae_dist.training.distributed import main_print, max_over_ranks, on_main_then_share
from vae_dist.errors import ArtifactError, ConfigError, first_line
from vae_dist.run.fileio import print_out
from vae_dist.training.learner import Learner
from vae_dist import models
from vae_dist.models.protocol import Model
from vae_dist.training.signals import Preempted, StopRequest
from vae_dist.training.summary import format_summary
from vae_dist.training.tracking import Tracker, check_report_to, close_trackers

# Collectives give up after this long, so a rank that died on another node cannot leave
# the rest waiting for torch's default 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Each epoch's pictures: this many test images above their reconstructions, and samples.
NUM_PREVIEW = 32
NUM_SAMPLES = 64
PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # the launcher's --mixed_precision
# The config's choices (Optional[Literal[...]]).
PRECISIONS = typing.get_args(typing.get_args(TrainingConfig.model_fields["mixed_precision"].annotation)[0])


def make_accelerator(config: TrainingConfig) -> Accelerator:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = config.cpu
    if not cpu and world > 1 and not torch.cuda.is_available():
        # Without this, `accelerate launch --multi_gpu` on a machine with no GPU starts N
        # independent single-process trainings that all believe they are the main one.
        cpu = True
        if int(os.environ.get("RANK", "0")) == 0:
            print_out(f"no GPU found: running the {world} processes as CPU (gloo) ranks (pass --cpu to say so)",
                      required=False)
    # Accelerate takes any ACCELERATE_MIXED_PRECISION, and fp16 on the CPU, without a word:
    # the run would record a precision it never trained in.
    precision = config.mixed_precision
    named = f"--mixed-precision {precision}"
    if precision is None:
        precision = os.environ.get(PRECISION_ENV) or "no"
        named = f"{PRECISION_ENV}={precision}"
        if precision not in PRECISIONS:
            raise ConfigError(f"{named}: must be one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ConfigError(f"{named} needs a GPU; on the CPU use bf16 or no")
    try:
        return Accelerator(
            cpu=cpu,
            mixed_precision=config.mixed_precision,
            dataloader_config=DataLoaderConfiguration(even_batches=True),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
            dynamo_backend="inductor" if config.compile else None,
        )
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot set up the accelerator: {first_line(e)}") from None


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Adam:
    """torch.optim.Adam as configured. ``fused`` runs one kernel over all parameters instead
    of a handful of ops per tensor (see OptimizerConfig.fused)."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.eps,  # type: ignore[arg-type]
        weight_decay=cfg.weight_decay, fused=cfg.fused or None,
    )


def data_dir_for(accelerator: Accelerator, config: TrainingConfig) -> Path:
    """The folder of IDX files: the given one, or a download made by the main process
    while the others wait (torchvision writes straight to the final paths)."""
    if config.data.data_dir:
        return Path(config.data.data_dir).expanduser()
    return on_main_then_share(accelerator, lambda: datasets.download(config.data.cache_dir, config.data.dataset))


def load_images(accelerator: Accelerator, config: TrainingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    folder = data_dir_for(accelerator, config)
    train, test = datasets.load_split(folder, "train", config.data.dataset).images, evaluate.test_images(config, folder)
    for split in (train, test):  # the models are built for 1x28x28 images (for now)
        if split.shape[1:] != (1, 28, 28):
            raise ConfigError(f"{config.data.dataset} images are {split.shape[2]}x{split.shape[3]}; the models take 28x28")
    if config.data.binarize == "static":  # before the limit: a sample's draw depends on its index, not on the slice
        train = keyed.binarize_split(train, config.seed, keyed.STATIC_STREAM)
    if config.data.limit_train_samples:
        train = train[: config.data.limit_train_samples]
    return train, test


def epoch_previews(
    root: Path, tracker: Tracker, say: Callable[[str], None], test_images: torch.Tensor, seed: int
) -> Callable[[Model, int, int], None]:
    """The Learner's on_epoch_end: the first test images above their reconstructions, and
    samples from the prior (the same latents every epoch), as PNGs under images/ and to the trackers."""
    originals = test_images[:NUM_PREVIEW].float().div(255.0).cpu()

    def write(model: Model, epoch: int, step: int) -> None:
        grids = {
            "valid/reconstructions": images.side_by_side(originals, inference.reconstructions(model, originals)),
            "prior/samples": inference.prior_samples(model, NUM_SAMPLES, seed),  # not valid/samples: a count
        }
        written = {}
        for key, tiles in grids.items():
            path = folder.epoch_picture(root, epoch, key.split("/")[1])
            try:
                images.save_grid(tiles, path, nrow=8)
                written[key] = str(path)
            except OSError as e:  # a preview is not worth a run
                say(f"preview {path} not written ({e.strerror or e}); training goes on")
        if written:
            tracker.log_images(written, step=step)

    return write


def check_resumable(root: Path, config: TrainingConfig) -> None:
    """--resume continues the run in ``root``: the same model and data, and a checkpoint
    to continue from whenever the run already got far enough to write its outputs."""
    saved = TrainingConfig.from_json_file(root / folder.CONFIG)
    mismatch = resume_mismatch(saved, config)
    if mismatch:
        raise ConfigError(f"cannot resume: {mismatch}")
    checkpoints = root / folder.CHECKPOINTS
    has_checkpoint = checkpoints.is_dir() and any(
        p.is_dir() and (p.name.startswith("step-") or p.name.startswith(TMP_PREFIX)) for p in checkpoints.iterdir()
    )
    finished = [name for name in (folder.MODEL, folder.METRICS) if (root / name).exists()]
    if finished and not has_checkpoint:
        raise ArtifactError(
            f"cannot resume {root}: it holds {' and '.join(finished)} but no checkpoint ({checkpoints} is missing "
            "or empty), so resuming would start again from step 0 over them; use --overwrite to start again"
        )


def claim_artifact_dir(
    config: TrainingConfig, lock: folder.RunLock, *, resume: bool, overwrite: bool, run_id: str
) -> tuple[Path, str]:
    """Main process: check the folder (and what --resume needs), lock it, then prepare it.
    Returns the folder and the run's id: ``run_id`` for a new run, the marker's on --resume."""
    try:
        root = folder.check_artifact_dir(config.artifact_dir, overwrite=overwrite, resume=resume)
        if resume:
            check_resumable(root, config)
        root = folder.prepare_artifact_dir(root, overwrite=overwrite, resume=resume, lock=lock, run_id=run_id)
        return root, folder.marker_run_id(root)
    except OSError as e:
        raise ArtifactError(f"artifact directory {config.artifact_dir} cannot be used: {e.strerror or e}") from None


def with_precision(config: TrainingConfig, precision: str) -> TrainingConfig:
    return TrainingConfig.from_dict({**config.to_dict(), "mixed_precision": precision})


def train(config: TrainingConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as configured; returns the path of the saved model.safetensors.

    Process-wide settings (vae_dist.runtime.prepare_process) are the caller's: the CLI
    applies them at its entry point, before any tensor work."""
    check_report_to(config)
    acc = make_accelerator(config)
    # A stop signal from here to the first step (loading, building, preparing) ends the run
    # at once, as an exception (nothing to checkpoint yet); from the first step on, _train
    # hands it to the loop as a request. Not in the rendezvous above: a rank waiting there
    # for one that the signal ended would wait for the timeout (the store does not see a
    # peer that never came), where the signal's default action ends it at once.
    with StopRequest(at_once=True) as stop:
        return _set_up_and_train(acc, config, stop, resume=resume, overwrite=overwrite)


def _set_up_and_train(acc: Accelerator, config: TrainingConfig, stop: StopRequest, *, resume: bool,
                      overwrite: bool) -> Path:
    lock = folder.RunLock()
    try:
        return _train(acc, config, lock, stop, resume=resume, overwrite=overwrite)
    finally:
        try:
            # Trackers first, each failure one line: a W&B that never started must not
            # fail a finished run from inside end_training().
            close_trackers(acc, main_print(acc))
            # Drops the prepared model (DDP holds the process group) and collects the
            # reference cycles that can still reach it (matplotlib's parser keeps
            # tracebacks, and with them this call's frames): else the group outlives
            # end_training below.
            acc.free_memory()
            # Closes W&B and destroys the process group, joining its gloo threads while
            # the interpreter is whole: left to its teardown, they can abort a finished
            # rank ("terminate called without an active exception").
            acc.end_training()
        finally:
            lock.release()


def _train(
    acc: Accelerator, config: TrainingConfig, lock: folder.RunLock, stop: StopRequest, *, resume: bool,
    overwrite: bool,
) -> Path:
    # Record the precision actually in force (the launcher may have chosen it).
    config = with_precision(config, acc.mixed_precision)
    say = main_print(acc)
    # Everything that can fail is checked before the artifact folder is touched: a wrong
    # --data-dir, a batch larger than the data or an absurd model must not cost the
    # previous run's files to --overwrite.
    train_images, test_images = load_images(acc, config)
    loaders.check_batch_fits(len(train_images), config.data.batch_size, acc.num_processes)
    modelfile.check_model_size(config, "config")
    resources.check_resources(config, len(train_images), len(test_images), acc.device)  # memory, a compiler
    set_seed(config.seed)  # the same initial weights on every rank
    model = models.build(config)
    model.noise_shape(config.loss.iw_samples)  # a family refuses an objective it has not
    optimizer = make_optimizer(model, config.optimizer)
    root, run_id = on_main_then_share(
        acc, lambda: claim_artifact_dir(config, lock, resume=resume, overwrite=overwrite, run_id=folder.new_run_id())
    )

    workers = config.data.num_workers
    if acc.device.type == "cuda":
        # The dataset lives on the GPU and each batch is one index there: no host copies,
        # and so no loader workers (they cannot share CUDA tensors).
        train_images, test_images, workers = train_images.to(acc.device), test_images.to(acc.device), 0
    train_loader = loaders.make_loader(
        loaders.MnistImages(train_images), config.data.batch_size, shuffle_seed=config.seed, drop_last=True,
        num_workers=workers,
    )
    valid_loader = loaders.make_loader(
        loaders.MnistImages(test_images), config.data.eval_batch_size, shuffle_seed=None, drop_last=False,
        num_workers=workers,
    )
    global_batch = config.data.batch_size * acc.num_processes
    say(
        f"training {config.model.kind} ({models.parameter_count(config):,} parameters) on {len(train_images)} "
        f"{config.data.dataset} images, {acc.num_processes} process(es) on {acc.device.type}: global batch {global_batch} "
        f"= {config.data.batch_size} per process x {acc.num_processes}, {len(train_images) // global_batch} steps per epoch"
    )

    tracker = Tracker(acc, say)
    learner = Learner(
        acc,
        model,
        optimizer,
        config,
        train_loader,
        valid_loader,
        artifact_dir=root,
        tracker=tracker,
        checkpointer=Checkpointer(
            acc, root / folder.CHECKPOINTS, config.keep_checkpoints, say, every_steps=config.checkpoint_every_steps,
            run_id=run_id,
        ),
        run_id=run_id,
        on_epoch_end=epoch_previews(root, tracker, say, test_images, config.seed),
    )
    if resume:
        learner.restore()  # what it refuses (another config, --max-steps below the checkpoint) leaves config.json as it was
    on_main_then_share(acc, lambda: folder.write_config(root, config))
    tracker.start(config, run_id, root, first_step=learner.position.global_step)
    t0 = time.perf_counter()
    # One stop request from the first step to the end of the export: a SIGTERM/SIGINT/SIGHUP
    # after the last step (final validation, the export) lets the export finish, and the
    # run then ends with the stop's line and exit status, the same on every rank.
    with stop.deferred():
        path = _fit_and_export(acc, config, learner, tracker, root, stop, say, t0)
        signum = max_over_ranks(acc, stop.signum or 0)
    if signum:
        raise Preempted(signum, str(path), finished=True)
    return path


def _fit_and_export(
    acc: Accelerator, config: TrainingConfig, learner: Learner, tracker: Tracker, root: Path, stop: StopRequest,
    say: Callable[[str], None], t0: float,
) -> Path:
    learner.fit(stop)
    # Every rank takes part in gathering the weights (needed for sharded models); one writes.
    # Without the compile wrapper's "_orig_mod." in the names: the file is the plain model's.
    state = modelfile.strip_compile_prefix(acc.get_state_dict(learner.model))
    path = root / folder.MODEL

    def finish() -> None:
        history = learner.position.history
        last = {k: v for k, v in history[-1].items() if k.startswith("valid/") or k in ("epoch", "step", "protocol")}
        modelfile.save_model_file(path, state, config, results=last)
        tracker.record_results(path, config, history, last)
        tracker.finish()
        try:
            images.save_loss_curves(history, root / folder.LOSS_CURVES)
        except OSError as e:  # the model is saved: a picture is not worth failing the run
            say(f"loss curves {root / folder.LOSS_CURVES} not written ({e.strerror or e}); the model is saved")
        say(format_summary(history, learner.family.TERMS))
        say(f"trained in {time.perf_counter() - t0:.1f} s; model saved to {path}")

    on_main_then_share(acc, finish)
    acc.wait_for_everyone()
    return path
