"""``train(config)``: trackers' packages -> Accelerator -> data -> every check that can fail -> seed -> model ->
optimizer -> run folder (locked) -> Learner -> restore (--resume) -> config.json -> trackers -> fit -> export.
Nothing in the run folder is created or deleted until everything that can be checked first has passed."""

from __future__ import annotations

import os
import time
import typing
from pathlib import Path
from typing import Callable, Optional

import torch
# Imported before any process group exists: its functions take `group=group.WORLD` as a default argument,
# so imported later (DDP does) they would hold the group until teardown, whose gloo threads can abort a rank.
import torch.distributed.nn  # noqa: F401
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from vae_dist import models
from vae_dist.config import OptimizerConfig, TrainingConfig, merge, resume_mismatch
from vae_dist.data import datasets, keyed, loaders
from vae_dist.data.datasets import Split
from vae_dist.errors import ArtifactError, ConfigError, first_line
from vae_dist.evaluation import evaluate, images
from vae_dist.models.protocol import Model
from vae_dist.run import folder, modelfile
from vae_dist.run.checkpoint import TMP_PREFIX, Checkpointer
from vae_dist.run.fileio import print_out
from vae_dist.training import runtime
from vae_dist.training.distributed import (Preempted, StopRequest, join_processes, launch_env, main_print,
                                           max_over_ranks, on_main_then_share)
from vae_dist.training.learner import Learner
from vae_dist.training.tracking import Tracker, check_report_to, close_trackers, format_summary

NUM_PREVIEW = 32  # each epoch's pictures: this many test images above their reconstructions
NUM_SAMPLES = 64  # and this many samples from the prior
PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # the launcher's --mixed_precision
PRECISIONS = typing.get_args(typing.get_args(TrainingConfig.model_fields["mixed_precision"].annotation)[0])


def train(config: TrainingConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as configured; returns the path of model.safetensors. Process-wide settings
    (runtime.prepare_process) are the caller's, applied before any tensor work."""
    check_report_to(config)
    acc = make_accelerator(config)
    # Until the first step a stop signal ends the run at once (nothing to checkpoint). Not around the
    # rendezvous above: a rank waiting there for one that the signal ended would wait for the timeout.
    with StopRequest(at_once=True) as stop:
        lock = folder.RunLock()
        try:
            return _train(acc, config, lock, stop, resume=resume, overwrite=overwrite)
        finally:
            try:
                close_trackers(acc, main_print(acc))  # each failure one line, so end_training() cannot fail on one
                if acc.num_processes > 1:  # drops the prepared model: DDP holds the process group (a full gc.collect)
                    acc.free_memory()
                acc.end_training()  # joins gloo's threads now: left to the teardown, they can abort a finished rank
            finally:
                lock.release()


def _train(acc: Accelerator, config: TrainingConfig, lock: folder.RunLock, stop: StopRequest, *, resume: bool,
           overwrite: bool) -> Path:
    config = TrainingConfig.from_dict({**config.to_dict(), "mixed_precision": acc.mixed_precision})  # as in force
    say = main_print(acc)
    # Everything that can fail is checked before the run folder is touched: --overwrite must not cost the
    # previous run for a wrong --data-dir, a batch larger than the data or an absurd model.
    config, train, test = load_images(acc, config)
    train_images, test_images = train.images, test.images
    loaders.check_batch_fits(len(train_images), config.data.batch_size, acc.num_processes)
    modelfile.check_model_size(config, "config")
    runtime.check_memory(config, len(train_images), len(test_images), acc.device)
    set_seed(config.seed)  # the same initial weights on every rank
    model = models.build(config)
    model.noise_shape(config.loss.iw_samples)  # a family refuses an objective it has not
    optimizer = make_optimizer(model, config.optimizer)
    root, run_id = on_main_then_share(acc, lambda: claim_artifact_dir(config, lock, resume=resume, overwrite=overwrite))
    workers = config.data.num_workers
    if acc.device.type == "cuda":  # the data on the GPU, a batch one index there: no copies, so no workers
        train_images, test_images, workers = train_images.to(acc.device), test_images.to(acc.device), 0
    batch, n = config.data.batch_size, acc.num_processes
    size = sum(p.numel() for p in model.parameters())
    mode = config.data.binarize
    pixels = "grey-level" if mode == "none" else f"{mode}ally binarized"  # dynamically, statically
    say(f"training {config.model.kind} ({size:,} parameters) on {len(train_images)} {config.data.dataset} images "
        f"({pixels}, {config.loss.recon_loss} likelihood), {n} process(es) on {acc.device.type}: "
        f"global batch {batch * n} = {batch} per process x {n}, {len(train_images) // (batch * n)} steps per epoch")
    tracker = Tracker(acc, say)
    train_loader = loaders.make_loader(loaders.MnistImages(train_images, train.labels), batch, shuffle_seed=config.seed,
                                       drop_last=True, num_workers=workers)
    valid_loader = loaders.make_loader(loaders.MnistImages(test_images, test.labels), config.data.eval_batch_size,
                                       shuffle_seed=None, drop_last=False, num_workers=workers)
    checkpointer = Checkpointer(acc, root / folder.CHECKPOINTS, config.keep_checkpoints, say,
                                every_steps=config.checkpoint_every_steps, run_id=run_id)
    learner = Learner(acc, model, optimizer, config, train_loader, valid_loader, artifact_dir=root, tracker=tracker,
                      checkpointer=checkpointer, run_id=run_id,
                      on_epoch_end=epoch_previews(root, tracker, say, test.images, config.seed, test.labels))
    if resume:
        learner.restore()  # what it refuses leaves config.json as it was
    on_main_then_share(acc, lambda: folder.write_run_file(root / folder.CONFIG, config.to_json().encode()))
    tracker.start(config, run_id, root, first_step=learner.position.global_step)
    t0 = time.perf_counter()
    # From the first step to the end of the export a stop is a request: the export finishes, then the run
    # ends with the stop's line and exit status, the same on every rank.
    with stop.deferred():
        learner.fit(stop)
        path = export(acc, config, learner, tracker, root, say, t0)
        signum = max_over_ranks(acc, stop.signum or 0)
    if signum:
        raise Preempted(signum, str(path), finished=True)
    return path


def make_accelerator(config: TrainingConfig) -> Accelerator:
    (rank, world), cpu = launch_env(), config.cpu
    if not cpu and world > 1 and not torch.cuda.is_available():
        # Else `accelerate launch --multi_gpu` without a GPU starts N trainings that each believe they are the main one.
        cpu = True
        if rank == 0:
            print_out(f"no GPU found: running the {world} processes as CPU (gloo) ranks (pass --cpu to say so)",
                      required=False)
    # Accelerate takes any ACCELERATE_MIXED_PRECISION, and fp16 on the CPU, without a word.
    precision, named = config.mixed_precision, f"--mixed-precision {config.mixed_precision}"
    if precision is None:
        precision = os.environ.get(PRECISION_ENV) or "no"
        named = f"{PRECISION_ENV}={precision}"
        if precision not in PRECISIONS:
            raise ConfigError(f"{named}: must be one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ConfigError(f"{named} needs a GPU; on the CPU use bf16 or no")
    # Accelerate keeps the precision and the compile backend of the process's first Accelerator: a run after another
    # in one process (the API, a notebook) would inherit them silently, or be refused for asking for its own.
    AcceleratorState._reset_state()
    try:
        join_processes(cpu)
        return Accelerator(cpu=cpu, mixed_precision=precision,
                           dynamo_backend="inductor" if config.compile else None)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot set up the accelerator: {first_line(e)}") from None


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas),  # type: ignore[arg-type]
                            eps=cfg.eps, weight_decay=cfg.weight_decay, fused=cfg.fused or None)


def load_images(accelerator: Accelerator, config: TrainingConfig) -> tuple[TrainingConfig, Split, Split]:
    """The config with the model sized to the training data (model.image_shape, and a conditional model's
    num_classes), and the train and test splits (uint8 images; labels for a conditional model, else None): from
    --data-dir, or a download by the main process while the others wait."""
    data, conditional = config.data, config.model.conditional
    where = Path(data.data_dir).expanduser() if data.data_dir else \
        on_main_then_share(accelerator, lambda: datasets.download(data.cache_dir, data.dataset))
    train, labels, classes = datasets.load_split(where, "train", data.dataset)
    if conditional and labels is None:
        raise ConfigError(f"--conditional needs class labels, and the {data.dataset} training images in {where} have "
                          "none (npy: add train_labels.npy and test_labels.npy)")
    sized = {"image_shape": list(train.shape[1:]), "num_classes": classes if conditional else None}
    config = TrainingConfig.from_dict(merge(config.to_dict(), {"model": sized}))
    test = evaluate.test_split(config, where)  # of the same shape and classes, or refused
    if data.binarize == "static":  # before the limit: a sample's draw depends on its index, not on the slice
        train = keyed.binarize_split(train, config.seed, keyed.STATIC_STREAM)
    first = slice(data.limit_train_samples)
    return config, Split(train[first], labels[first] if conditional else None, classes), test


def epoch_previews(root: Path, tracker: Tracker, say: Callable[[str], None], test_images: torch.Tensor,
                   seed: int, test_labels: Optional[torch.Tensor] = None) -> Callable[[Model, int, int], None]:
    """The Learner's on_epoch_end: test images above their reconstructions, and samples from the prior
    (the same latents every epoch; a conditional model's one row of 8 per class), as PNGs under images/ and to
    the trackers."""
    originals = test_images[:NUM_PREVIEW].float().div(255.0).cpu()
    labels = None if test_labels is None else test_labels[:NUM_PREVIEW].cpu()
    def write(model: Model, epoch: int, step: int) -> None:
        samples = 8 * model.num_classes if model.num_classes else NUM_SAMPLES
        recon = images.side_by_side(originals, evaluate.reconstructions(model, originals, labels))
        grids = {"valid/reconstructions": (recon, images.SIDE_BY_SIDE),
                 "prior/samples": (evaluate.prior_samples(model, samples, seed), ())}  # not valid/samples: a count
        written = {}
        for key, (tiles, row_labels) in grids.items():
            path = root / folder.IMAGES / f"epoch-{epoch:03d}-{key.split('/')[1]}.png"
            try:
                images.save_grid(tiles, path, nrow=8, row_labels=row_labels)
                written[key] = str(path)
            except OSError as e:  # a preview is not worth a run
                say(f"preview {path} not written ({e.strerror or e}); training goes on")
        if written:
            tracker.log_images(written, step=step)
    return write


def claim_artifact_dir(config: TrainingConfig, lock: folder.RunLock, *, resume: bool,
                       overwrite: bool) -> tuple[Path, str]:
    """Main process: check the folder (and what --resume needs), lock it, then prepare it.
    Returns the folder and the run's id: a new one for a new run, the marker's on --resume."""
    try:
        root = folder.check_artifact_dir(config.artifact_dir, overwrite=overwrite, resume=resume)
        if resume:
            if mismatch := resume_mismatch(TrainingConfig.from_json_file(root / folder.CONFIG), config):
                raise ConfigError(f"cannot resume: {mismatch}")
            checkpoints = root / folder.CHECKPOINTS
            has_checkpoint = checkpoints.is_dir() and any(p.is_dir() and p.name.startswith(("step-", TMP_PREFIX))
                                                          for p in checkpoints.iterdir())
            finished = [name for name in (folder.MODEL, folder.METRICS) if (root / name).exists()]
            if finished and not has_checkpoint:
                raise ArtifactError(f"cannot resume {root}: it holds {' and '.join(finished)} but no checkpoint "
                                    f"({checkpoints} is missing or empty), so resuming would start again from step 0 "
                                    "over them; use --overwrite to start again")
        root = folder.prepare_artifact_dir(root, overwrite=overwrite, resume=resume, lock=lock,
                                           run_id=folder.new_run_id())
        return root, folder.marker_run_id(root)
    except OSError as e:
        raise ArtifactError(f"artifact directory {config.artifact_dir} cannot be used: {e.strerror or e}") from None


def export(acc: Accelerator, config: TrainingConfig, learner: Learner, tracker: Tracker, root: Path,
           say: Callable[[str], None], t0: float) -> Path:
    """model.safetensors (the weights gathered by every rank, written by one), W&B's summary, loss curves."""
    state = modelfile.strip_compile_prefix(acc.get_state_dict(learner.model))  # the plain model's names
    path = root / folder.MODEL
    def finish() -> None:
        history, last = learner.position.history, learner.position.results()
        modelfile.save_model_file(path, state, config, results=last)
        tracker.record_results(path, config, history, last)
        close_trackers(acc, say)  # not end_training(): the process group is still needed
        try:
            images.save_loss_curves(history, root / folder.LOSS_CURVES)
        except OSError as e:  # the model is saved: a picture is not worth failing the run
            say(f"loss curves {root / folder.LOSS_CURVES} not written ({e.strerror or e}); the model is saved")
        say(format_summary(history, learner.family.TERMS))
        say(f"trained in {time.perf_counter() - t0:.1f} s; model saved to {path}")
    on_main_then_share(acc, finish)
    acc.wait_for_everyone()
    return path
