"""The Learner: ``fit`` orders epochs, train steps, logging, checkpoints and validation.

``train_step`` owns one optimizer step; ``fit`` reads top to bottom on one screen.
Metrics are accumulated on the device (vae_dist.meter) and reduced across ranks only
when they are reported, so a step never waits for the host (no ``.item()`` per step).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

from vae_dist.data import keyed
from vae_dist.training import faults
from vae_dist.run.checkpoint import Checkpointer
from vae_dist.config import TrainingConfig
from vae_dist.training.distributed import main_print, max_over_ranks, on_main_then_share
from vae_dist.errors import TrainingError, first_line
from vae_dist.evaluation.evaluate import protocol, validate
from vae_dist.training.meter import TrainMeter
from vae_dist.models.protocol import Model
from vae_dist.data.keyed import EVAL_NOISE, TRAIN_NOISE, noise
from vae_dist.run.position import Position
from vae_dist.training.progress import Progress
from vae_dist.run.folder import write_metrics
from vae_dist.training.schedule import kl_weight, learning_rate
from vae_dist.training.signals import Preempted, StopRequest
from vae_dist.training.tracking import Tracker

# How often ranks agree on a stop request when there are several: each agreement is an
# all-reduce and a host sync, so it is not done every step.
STOP_SYNC_EVERY = 10


def _raise_if_compile_failed(e: Exception, step: int, device: str) -> None:
    """--compile's failure (inductor finds no working compiler) as one line where it happens,
    at the first step: no check before the run, since a failure there costs no previous run."""
    from torch._dynamo.exc import BackendCompilerFailed  # InductorError is one

    if isinstance(e, BackendCompilerFailed):
        inner = getattr(e, "inner_exception", None) or e
        need = "triton and a C compiler" if device == "cuda" else "a C++ compiler (or set CXX)"
        raise TrainingError(f"--compile failed at step {step} ({type(inner).__name__}: {first_line(inner)}): "
                            f"install {need} or drop --compile") from None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    images_batch: torch.Tensor,
    noise: Optional[torch.Tensor],
    *,
    kl_weight: float,
    max_grad_norm: Optional[float],
    lr: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (the family's objective), backward, clip, Adam step at rate ``lr`` (None: the
    optimizer's own). Returns (sums, loss) still on the device: sums = each of the family's
    terms summed over this rank's batch."""
    terms = model(images_batch, noise, kl_weight=kl_weight).terms
    loss = terms["loss"].mean()
    accelerator.backward(loss)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # One stack and one reduction: per-step bookkeeping is a visible share of a CPU step.
    sums = torch.stack([t.detach() for t in terms.values()]).sum(dim=1)
    return sums, loss.detach()


def stepping_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer ``train_step`` calls. Accelerate's wrapper adds something only with a
    gradient scaler (fp16), gradient accumulation or XLA; otherwise its step() and zero_grad()
    just forward, after looking for the lomo_optim package and inspecting zero_grad's
    signature on every call. The torch optimizer is the same object either way, so
    checkpoints (through the wrapper) see it."""
    if (
        isinstance(optimizer, AcceleratedOptimizer)
        and optimizer.scaler is None
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.distributed_type != DistributedType.XLA
    ):
        return optimizer.optimizer
    return optimizer


class Learner:
    """Trains a VAE with Accelerate: prepare, fit, validate, checkpoint, summarise."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: Model,
        optimizer: torch.optim.Optimizer,
        config: TrainingConfig,
        train_loader: DataLoader,
        valid_loader: DataLoader,
        *,
        artifact_dir: Path,
        tracker: Tracker,
        checkpointer: Checkpointer,
        run_id: str = "",
        on_epoch_end: Optional[Callable[[Model, int, int], None]] = None,
    ):
        """``on_epoch_end(model, epoch, step)`` runs after each epoch's validation, on the
        main process only and with the unwrapped model, so it may not be collective.
        A run that resumes calls ``restore()`` before ``fit()``; the caller starts ``tracker``
        before and finishes it after (train() does, around the export)."""
        self.acc = accelerator
        self.config = config
        self.family = model  # the unwrapped model: its protocol (terms, noise, prior)
        self.sampler = train_loader.sampler  # EpochShuffleSampler: the order is a function of (seed, epoch)
        self.train_images = train_loader.dataset.images  # type: ignore[attr-defined]  # what fit_prior sees
        self.num_train = len(self.train_images)
        self.model, self.optimizer, self.train_loader, self.valid_loader = accelerator.prepare(
            model, optimizer, train_loader, valid_loader
        )
        self.step_optimizer = stepping_optimizer(accelerator, self.optimizer)
        self.steps_per_epoch = len(self.train_loader)
        valid_noise = noise(EVAL_NOISE, config.seed, 0, len(valid_loader.dataset), model.noise_shape(1))  # type: ignore[arg-type]
        self.valid_noise = valid_noise.to(accelerator.device) if valid_noise is not None else None
        self.artifact_dir = artifact_dir
        self.tracker = tracker
        self.checkpointer = checkpointer
        self.on_epoch_end = on_epoch_end
        self.say: Callable[[str], None] = main_print(accelerator)
        self.position = Position.start(run_id, accelerator.num_processes, config, len(model.TERMS))
        self.meter = TrainMeter(accelerator.device, len(model.TERMS))

    def fit(self, stop: Optional[StopRequest] = None) -> nn.Module:
        """Train for ``config.epochs`` (or ``max_steps``); returns the trained (unwrapped) model.

        ``stop``: a StopRequest the caller has entered and keeps past this call (so a stop
        that comes after the last step is still seen); else fit installs its own."""
        cfg, pos, meter = self.config, self.position, self.meter
        if self._max_steps_reached() and (not pos.history or pos.history[-1].get("step") != pos.global_step):
            # Resumed at max_steps with no row for this step (the checkpoint of a stop
            # signal): end the epoch in progress as a run stopped by max_steps would.
            self._start_epoch()
            self._end_epoch()
        with nullcontext(stop) if stop is not None else StopRequest() as stop:
            while pos.epoch < cfg.epochs and not self._max_steps_reached():
                epoch_noise, coins = self._start_epoch()
                progress = Progress(f"epoch {pos.epoch + 1}/{cfg.epochs}", self.steps_per_epoch, pos.batches_done,
                                    enabled=self.acc.is_main_process)
                try:
                    for images_batch, index in self._batches():
                        if coins is not None:  # dynamic binarization: this epoch's draw of each sample
                            images_batch = keyed.apply(images_batch, coins.index_select(0, index))
                        sums, loss = train_step(
                            self.model, self.step_optimizer, self.acc, images_batch,
                            None if epoch_noise is None else epoch_noise.index_select(0, index), kl_weight=self._kl_weight(),
                            max_grad_norm=cfg.optimizer.max_grad_norm, lr=self._lr(),
                        )
                        pos.global_step += 1
                        pos.batches_done += 1
                        meter.add(sums, loss, images_batch.shape[0], self.acc.num_processes, pos.global_step)
                        progress.step()
                        if pos.global_step % cfg.log_every_steps == 0:
                            self._log_train(progress)
                        signum = self._stop_agreed(stop)
                        if signum:
                            raise Preempted(signum, str(self._save()))
                        if self._max_steps_reached():
                            break
                        self.checkpointer.maybe_save(pos.global_step, pos.batches_done < self.steps_per_epoch,
                                                     self._checkpoint_state)
                except Exception as e:
                    if cfg.compile:
                        _raise_if_compile_failed(e, pos.global_step + 1, self.acc.device.type)
                    raise
                finally:
                    progress.close()  # also on errors, so the message does not land on the bar's line
                # Freed before the next epoch draws its own: else, from the second epoch on,
                # two noise tables (N x K x latent) are held at once.
                epoch_noise = coins = None
                self._end_epoch()
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------ pieces

    def restore(self) -> None:
        """Load the newest usable checkpoint into the prepared objects and take its position,
        or refuse it (another config, --max-steps below it, ...). Apart from the lock, the
        run folder is as it was until this has passed: train() writes config.json after it."""
        found = self.checkpointer.load_latest()
        if found is None:
            self.say("--resume: no checkpoint written yet; starting from step 0")
            return
        found.manifest.state.check_resumable(found.path.name, self.config, self.acc.num_processes, self.steps_per_epoch)
        # From here on the checkpoints record this run's config (a resumable field may have changed).
        self.position = found.manifest.state.model_copy(
            update={"num_processes": self.acc.num_processes, "config": self.config}
        )
        self.say(
            f"resumed from {found.path.name}: epoch {self.position.epoch + 1}, "
            f"batch {self.position.batches_done}/{self.steps_per_epoch}, step {self.position.global_step}"
        )

    def _start_epoch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Set the epoch's order and start its sums. Returns the epoch's per-sample noise,
        (N, L) or (N, K, L) for K importance samples, and its binarization coins (dynamic
        binarization only), both indexed by the sample's position in the dataset."""
        cfg, pos, device = self.config, self.position, self.acc.device
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(pos.epoch)
        self.train_loader.set_epoch(pos.epoch)  # type: ignore[attr-defined]
        # A resumed partial epoch's sums (already reduced over ranks) are carried by rank 0.
        self.meter.start_epoch(pos.train_sums if pos.batches_done and self.acc.is_main_process else None)
        k = cfg.loss.iw_samples
        table = noise(TRAIN_NOISE, cfg.seed, pos.epoch, self.num_train, self.family.noise_shape(k))
        coins = None
        if cfg.data.binarize == "dynamic":
            coins = keyed.coins(cfg.seed, keyed.train_stream(pos.epoch), self.num_train).to(device)
        return None if table is None else table.to(device), coins

    def _batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches; resuming mid-epoch, the same permutation minus those done."""
        pos = self.position
        loader = self.acc.skip_first_batches(self.train_loader, pos.batches_done) if pos.batches_done else self.train_loader
        return faults.inject(loader, self.acc.process_index, pos.global_step) if faults.active() else loader

    def _lr(self) -> Optional[float]:
        """The rate of the step about to be taken. The schedule spans --epochs (not
        --max-steps), so that a run stopped by max_steps and resumed follows the same rates
        as an uninterrupted one."""
        pos = self.position
        return learning_rate(self.config.optimizer, pos.epoch, pos.batches_done, self.steps_per_epoch, self.config.epochs)

    def _kl_weight(self) -> float:
        """The KL weight at the position: of the step about to be taken, or after the last."""
        pos = self.position
        return kl_weight(self.config.loss, pos.epoch, pos.batches_done, self.steps_per_epoch)

    def _max_steps_reached(self) -> bool:
        m = self.config.max_steps
        return m is not None and self.position.global_step >= m

    def _stop_agreed(self, stop: StopRequest) -> int:
        """The signal every rank stops for (0: none): the largest signal number any rank
        received, so a rank that got none stops for, and names, the same one."""
        if self.acc.num_processes > 1 and self.position.global_step % STOP_SYNC_EVERY:
            return 0
        return max_over_ranks(self.acc, stop.signum or 0)  # no collective on one process

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t.clone(), reduction="sum") if self.acc.num_processes > 1 else t

    def _check_finite(self) -> None:
        """Raise on every rank if any rank saw a non-finite loss; names the first such step."""
        bad = self.acc.gather(self.meter.first_nonfinite_step())
        bad = bad[bad >= 0]
        if bad.numel():
            last = self.checkpointer.complete()
            kept = f"; the last good checkpoint {last[0].path} is kept" if last else ""
            raise TrainingError(f"loss became non-finite at step {int(bad.min())}{kept}")

    def _log_train(self, progress: Progress) -> None:
        self._check_finite()
        objective, images_count = self._reduce(self.meter.take_interval()).tolist()
        loss = objective / max(images_count, 1.0)
        progress.report(loss, self.meter.samples_per_second())
        self.tracker.log({"train/step_loss": loss}, step=self.position.global_step)

    def _checkpoint_state(self) -> Position:
        """The position to save, with the partial epoch's sums reduced over ranks. Collective."""
        self._check_finite()
        self.position.train_sums = [float(v) for v in self._reduce(self.meter.totals()).tolist()]
        return self.position

    def _save(self) -> Path:
        return self.checkpointer.save(self.position.global_step, self._checkpoint_state())

    def _end_epoch(self) -> None:
        """Validate, log and checkpoint at the end of an epoch (or of a max_steps run)."""
        pos, acc = self.position, self.acc
        epoch_done = pos.batches_done >= self.steps_per_epoch
        if not epoch_done and not self._max_steps_reached():
            # Would otherwise loop on the same epoch for ever.
            raise TrainingError(f"the training loader ended after {pos.batches_done} of {self.steps_per_epoch} batches")
        self._check_finite()
        *sums, count = self._reduce(self.meter.totals()).tolist()
        train_seconds, samples = self.meter.seconds(), self.meter.samples
        self.family.fit_prior(self.train_images.split(self.config.data.eval_batch_size))
        valid = validate(acc, self.model, self.valid_loader, self.valid_noise)
        valid_seconds = self.meter.seconds() - train_seconds
        row: dict[str, Any] = {
            "epoch": pos.epoch + 1,
            "step": pos.global_step,
            "complete_epoch": epoch_done,
            **{f"train/{name}": total / max(count, 1) for name, total in zip(self.family.TERMS, sums)},
            "train/samples": int(count),
            **valid,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/kl_weight": self._kl_weight(),
            "epoch_seconds": train_seconds + valid_seconds,
            "valid_seconds": valid_seconds,
            "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
            "protocol": protocol(self.config, valid["valid/samples"]),
        }
        # A partial epoch's row (max_steps) is replaced when the epoch is finished later.
        pos.history = [r for r in pos.history if r["epoch"] != row["epoch"]] + [row]
        on_main_then_share(acc, lambda: write_metrics(self.artifact_dir, pos.history))
        self.tracker.log({k: v for k, v in row.items() if k not in ("epoch", "step", "complete_epoch", "protocol")},
                         step=pos.global_step)
        if self.on_epoch_end is not None and acc.is_main_process:
            self.on_epoch_end(acc.unwrap_model(self.model), pos.epoch + 1, pos.global_step)
        parts = ", ".join(f"{t} {row['valid/' + t]:.3f}" for t in self.family.TERMS[1:])
        self.say(
            f"epoch {pos.epoch + 1}: train/loss {row['train/loss']:.3f}  valid/loss {row['valid/loss']:.3f} "
            f"({parts})  {row['epoch_seconds']:.1f} s, "
            f"{row['samples_per_second']:,.0f} samples/s"
        )
        if epoch_done:
            pos.epoch += 1
            pos.batches_done = 0
            self.meter.start_epoch()
        self._save()
