"""The Learner: ``fit`` orders epochs, train steps, logging, checkpoints and validation. Metrics are summed on
the device (TrainMeter) and reduced across ranks only when reported: a step never waits for the host."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from vae_dist.config import TrainingConfig
from vae_dist.data import keyed
from vae_dist.data.keyed import TRAIN_NOISE, noise
from vae_dist.errors import TrainingError, first_line
from vae_dist.evaluation.evaluate import protocol, valid_noise, validate
from vae_dist.models.protocol import Model
from vae_dist.run.checkpoint import Checkpointer
from vae_dist.run.folder import write_metrics
from vae_dist.run.position import Position
from vae_dist.training import faults
from vae_dist.training.distributed import Preempted, StopRequest, main_print, max_over_ranks, on_main_then_share
from vae_dist.training.schedule import kl_weight, learning_rate
from vae_dist.training.tracking import Progress, Tracker

# Ranks agree on a stop request every this many steps: each agreement is an all-reduce and a host sync.
STOP_SYNC_EVERY = 10


class TrainMeter:
    """One epoch's running sums on the device: a step adds in place and never waits for the host;
    the interval loss is a difference of snapshots, and losses wait to be checked until a report."""

    def __init__(self, device: torch.device, terms: int):
        self.device, self.terms = device, terms
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # (global step, loss) not yet checked
        self.start_epoch()

    def start_epoch(self, carried: Optional[list[float]] = None) -> None:
        """Zero the sums, or start from a resumed partial epoch's [*terms, count]."""
        *sums, self.count = carried or [0.0] * (self.terms + 1)  # count: this rank's images this epoch
        self.sums = torch.tensor(sums, dtype=torch.float64, device=self.device)  # the family's terms, objective first
        self.samples = 0  # images seen by all ranks since the epoch (or its resumed part) began
        self.started = time.perf_counter()
        self._mark = (self.sums.clone(), self.count)  # start of the current logging interval

    def add(self, step_sums: torch.Tensor, loss: torch.Tensor, images: int, world: int, step: int) -> None:
        self.sums += step_sums
        self.count += images
        self.samples += images * world
        self._unchecked.append((step, loss))

    def take_interval(self) -> torch.Tensor:
        """[objective sum, images] of this rank since the previous take."""
        objective, count = self._mark
        out = torch.stack([self.sums[0] - objective[0], torch.full_like(objective[0], self.count - count)])
        self._mark = (self.sums.clone(), self.count)
        return out

    def totals(self) -> torch.Tensor:
        """[*terms, count] of this rank's epoch so far."""
        return torch.cat([self.sums, torch.tensor([self.count], dtype=torch.float64, device=self.device)])

    def first_nonfinite_step(self) -> torch.Tensor:
        """(1,) the first global step since the last call whose loss was not finite, else -1."""
        pending, self._unchecked = self._unchecked, []
        first = torch.full((1,), -1, dtype=torch.long, device=self.device)
        if pending:
            steps = torch.tensor([s for s, _ in pending], device=self.device)
            bad = ~torch.isfinite(torch.stack([loss for _, loss in pending]))
            first = torch.where(bad.any(), steps[bad.int().argmax()], first)
        return first

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def stepping_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself where Accelerate's wrapper only forwards (no fp16 scaler, accumulation
    or XLA): its step() and zero_grad() cost a visible share of a CPU step. Checkpoints see the same object."""
    if (isinstance(optimizer, AcceleratedOptimizer) and optimizer.scaler is None
            and accelerator.gradient_accumulation_steps == 1 and accelerator.distributed_type != DistributedType.XLA):
        return optimizer.optimizer
    return optimizer


class Learner:
    """Trains a model with Accelerate. ``on_epoch_end(model, epoch, step)``: after each validation, on the main
    process only, with the unwrapped model (so not collective). A resumed run calls ``restore()`` before ``fit()``."""

    def __init__(self, accelerator: Accelerator, model: Model, optimizer: torch.optim.Optimizer, config: TrainingConfig,
                 train_loader: DataLoader, valid_loader: DataLoader, *, artifact_dir: Path, tracker: Tracker,
                 checkpointer: Checkpointer, run_id: str = "",
                 on_epoch_end: Optional[Callable[[Model, int, int], None]] = None):
        self.acc, self.config, self.artifact_dir = accelerator, config, artifact_dir
        self.tracker, self.checkpointer, self.on_epoch_end = tracker, checkpointer, on_epoch_end
        self.family = model  # the unwrapped model: its protocol (terms, noise, prior)
        self.train_images = train_loader.dataset.images  # type: ignore[attr-defined]  # what fit_prior sees
        self.train_labels = train_loader.dataset.labels  # type: ignore[attr-defined]  # a conditional model's
        prepared = accelerator.prepare(model, optimizer, train_loader, valid_loader)
        self.model, self.optimizer, self.train_loader, self.valid_loader = prepared
        self.step_optimizer = stepping_optimizer(accelerator, self.optimizer)
        self.steps_per_epoch = len(self.train_loader)
        table = valid_noise(model, config.seed, len(valid_loader.dataset))  # type: ignore[arg-type]
        self.valid_noise = None if table is None else table.to(accelerator.device)
        self.say = main_print(accelerator)
        self.position = Position.start(run_id, accelerator.num_processes, config, len(model.TERMS))
        self.meter = TrainMeter(accelerator.device, len(model.TERMS))

    def fit(self, stop: Optional[StopRequest] = None) -> None:
        """Train for ``config.epochs`` (or ``max_steps``). ``stop``: a StopRequest the caller keeps past this
        call (a stop after the last step is still seen)."""
        cfg, pos, acc = self.config, self.position, self.acc
        if self._max_steps_reached() and (not pos.history or pos.history[-1].get("step") != pos.global_step):
            # Resumed at max_steps with no row for this step (a stop's checkpoint): end the epoch as max_steps would.
            self._start_epoch()
            self._end_epoch()
        with nullcontext(stop) if stop is not None else StopRequest() as stop:
            while pos.epoch < cfg.epochs and not self._max_steps_reached():
                epoch_noise, coins = self._start_epoch()
                progress = self._progress()
                # Resuming mid-epoch: the same permutation minus the batches done.
                batches = acc.skip_first_batches(self.train_loader, pos.batches_done) if pos.batches_done \
                    else self.train_loader
                if faults.active():
                    batches = faults.inject(batches, acc.process_index, pos.global_step)
                try:
                    for images, index in batches:
                        self._train_step(images, index, epoch_noise, coins)
                        pos.global_step += 1
                        pos.batches_done += 1
                        progress.step()
                        if pos.global_step % cfg.log_every_steps == 0:
                            self._log_train(progress)
                        if acc.num_processes == 1 or pos.global_step % STOP_SYNC_EVERY == 0:
                            # Every rank stops for the largest signal any rank received.
                            if signum := max_over_ranks(acc, stop.signum or 0):
                                raise Preempted(signum, str(self._save()))
                        if self._max_steps_reached():
                            break
                        self.checkpointer.maybe_save(pos.global_step, pos.batches_done < self.steps_per_epoch,
                                                     self._checkpoint_state)
                except Exception as e:
                    if cfg.compile:
                        _raise_if_compile_failed(e, pos.global_step + 1, acc.device.type)
                    raise
                finally:
                    progress.close()  # also on errors, so the message does not land on the bar's line
                epoch_noise = coins = None  # freed before the next epoch draws its own (N x K x latent)
                self._end_epoch()

    def _progress(self) -> Progress:
        """This epoch's progress, with the run's steps left and its validations to come (at the last one's time)."""
        cfg, pos, per_epoch = self.config, self.position, self.steps_per_epoch
        steps = (cfg.epochs - pos.epoch) * per_epoch - pos.batches_done
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps - pos.global_step)
        validations = math.ceil((pos.batches_done + steps) / per_epoch)  # a max_steps run's last part validates too
        return Progress(f"epoch {pos.epoch + 1}/{cfg.epochs}", per_epoch, pos.batches_done, self.acc.is_main_process,
                        steps, validations * (pos.history[-1]["valid_seconds"] if pos.history else 0.0))

    def _train_step(self, images: torch.Tensor, index: torch.Tensor, epoch_noise: Optional[torch.Tensor],
                    coins: Optional[torch.Tensor]) -> None:
        """Forward (the family's objective; noise, coins and labels looked up by sample index), backward, clip, Adam."""
        cfg, pos = self.config, self.position
        if coins is not None:  # dynamic binarization: this epoch's draw of each sample
            images = keyed.apply(images, coins.index_select(0, index))
        step_noise, labels = (None if t is None else t.index_select(0, index) for t in (epoch_noise, self.train_labels))
        terms = self.model(images, step_noise, kl_weight=self._kl_weight(), labels=labels).terms
        loss = terms["loss"].mean()
        self.acc.backward(loss)
        # The schedule spans --epochs, not --max-steps: a run stopped by max_steps and resumed takes the same rates.
        lr = learning_rate(cfg.optimizer, pos.epoch, pos.batches_done, self.steps_per_epoch, cfg.epochs)
        if lr is not None:
            for group in self.step_optimizer.param_groups:
                group["lr"] = lr
        if cfg.optimizer.max_grad_norm is not None:
            self.acc.clip_grad_norm_(self.model.parameters(), cfg.optimizer.max_grad_norm)
        self.step_optimizer.step()
        self.step_optimizer.zero_grad(set_to_none=True)
        sums = torch.stack([t.detach() for t in terms.values()]).sum(dim=1)  # one stack, one reduction
        self.meter.add(sums, loss.detach(), images.shape[0], self.acc.num_processes, pos.global_step + 1)

    def restore(self) -> None:
        """Load the newest usable checkpoint and take its position, or refuse it (another config, --max-steps
        below it, ...). Apart from the lock, the run folder is untouched until this has passed."""
        found = self.checkpointer.load_latest(lambda: None if self._finite_weights() else "its weights are not finite")
        if found is None:
            self.say("--resume: no checkpoint written yet; starting from step 0")
            return
        found.manifest.state.check_resumable(found.path.name, self.config, self.acc.num_processes, self.steps_per_epoch)
        # From here on the checkpoints record this run's config (a resumable field may have changed).
        pos = self.position = found.manifest.state.model_copy(
            update={"num_processes": self.acc.num_processes, "config": self.config})
        cfg = self.config
        if pos.epoch >= cfg.epochs or self._max_steps_reached():  # fit() trains no step: train() exports again
            end = f"epoch {cfg.epochs}/{cfg.epochs} done" if pos.epoch >= cfg.epochs else f"--max-steps {cfg.max_steps}"
            self.say(f"resumed from {found.path.name}: the run is already complete ({end}, step {pos.global_step}): "
                     "nothing left to train; the model is exported again (a larger --epochs or --max-steps trains on)")
        else:
            self.say(f"resumed from {found.path.name}: epoch {pos.epoch + 1}, "
                     f"batch {pos.batches_done}/{self.steps_per_epoch}, step {pos.global_step}")

    def _start_epoch(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Set the epoch's order and start its sums. Returns its per-sample noise, (N, L) or (N, K, L), and
        binarization coins (dynamic binarization only), indexed by the sample's position in the dataset."""
        cfg, pos, device, (n, *shape) = self.config, self.position, self.acc.device, self.train_images.shape
        self.train_loader.set_epoch(pos.epoch)  # type: ignore[attr-defined]  # reaches the sampler: its order
        # A resumed partial epoch's sums (already reduced over ranks) are carried by rank 0.
        self.meter.start_epoch(pos.train_sums if pos.batches_done and self.acc.is_main_process else None)
        table = noise(TRAIN_NOISE, cfg.seed, pos.epoch, n, self.family.noise_shape(cfg.loss.iw_samples))
        coins = keyed.coins(cfg.seed, keyed.train_stream(pos.epoch), n, tuple(shape)).to(device) \
            if cfg.data.binarize == "dynamic" else None
        return None if table is None else table.to(device), coins

    def _kl_weight(self) -> float:  # of the step about to be taken, or after the last
        return kl_weight(self.config.loss, self.position.epoch, self.position.batches_done, self.steps_per_epoch)

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.position.global_step >= self.config.max_steps

    def _finite_weights(self) -> torch.Tensor:
        """() bool on the device. The largest |w| of each tensor: one fused kernel, and exact where a sum of
        squares of large finite weights would overflow."""
        return torch.stack(torch._foreach_norm(list(self.model.parameters()), float("inf"))).isfinite().all()

    def _check_finite(self) -> None:
        """Raise on every rank if any rank saw a non-finite loss or holds a non-finite weight (a last step can turn
        the weights NaN with a finite loss): one gather. Every checkpoint was checked so before it was saved."""
        weights_bad = (~self._finite_weights()).long().view(1)
        found = self.acc.gather(torch.cat([self.meter.first_nonfinite_step(), weights_bad])).view(-1, 2).tolist()
        loss = [step for step, _ in found if step >= 0]
        if loss or any(bad for _, bad in found):
            last = self.checkpointer.last
            what = f"loss became non-finite at step {min(loss)}" if loss else \
                f"weights became non-finite at step {self.position.global_step}"
            raise TrainingError(what + (f"; the last good checkpoint {last} is kept" if last else ""))

    def _log_train(self, progress: Progress) -> None:
        self._check_finite()
        objective, count = self.acc.reduce(self.meter.take_interval(), reduction="sum").tolist()
        loss = objective / max(count, 1.0)
        progress.report(loss, self.meter.samples / self.meter.seconds())  # a report follows a step: seconds > 0
        self.tracker.log({"train/step_loss": loss}, step=self.position.global_step)

    def _checkpoint_state(self) -> Position:
        """The position to save, with the partial epoch's sums reduced over ranks. Collective."""
        self._check_finite()
        self.position.train_sums = [float(v) for v in self.acc.reduce(self.meter.totals(), reduction="sum").tolist()]
        return self.position

    def _save(self) -> Path:
        return self.checkpointer.save(self.position.global_step, self._checkpoint_state())

    def _end_epoch(self) -> None:
        """Validate, log and checkpoint at the end of an epoch (or of a max_steps run)."""
        pos, acc, terms = self.position, self.acc, self.family.TERMS
        epoch_done = pos.batches_done >= self.steps_per_epoch
        if not epoch_done and not self._max_steps_reached():  # else the same epoch would loop for ever
            raise TrainingError(f"the training loader ended after {pos.batches_done} of {self.steps_per_epoch} batches")
        self._check_finite()
        *sums, count = self.acc.reduce(self.meter.totals(), reduction="sum").tolist()
        train_seconds = self.meter.seconds()
        self.family.fit_prior(self.train_images.split(self.config.data.eval_batch_size))
        valid = validate(acc, self.model, self.valid_loader, self.valid_noise, self.family)
        valid_seconds = self.meter.seconds() - train_seconds
        row: dict[str, Any] = {
            "epoch": pos.epoch + 1, "step": pos.global_step, "complete_epoch": epoch_done,
            **{f"train/{name}": total / max(count, 1) for name, total in zip(terms, sums)}, "train/samples": int(count),
            **valid, "train/lr": self.optimizer.param_groups[0]["lr"], "train/kl_weight": self._kl_weight(),
            "epoch_seconds": train_seconds + valid_seconds, "valid_seconds": valid_seconds,
            "samples_per_second": self.meter.samples / train_seconds if train_seconds > 0 else 0.0,
            "protocol": protocol(self.config, valid["valid/samples"])}
        # A partial epoch's row (max_steps) is replaced when the epoch is finished later.
        pos.history = [r for r in pos.history if r["epoch"] != row["epoch"]] + [row]
        on_main_then_share(acc, lambda: write_metrics(self.artifact_dir, pos.history))
        self.tracker.log({k: v for k, v in row.items() if k not in ("epoch", "step", "complete_epoch", "protocol")},
                         step=pos.global_step)
        if self.on_epoch_end is not None and acc.is_main_process:
            self.on_epoch_end(self.family, pos.epoch + 1, pos.global_step)
        parts = ", ".join(f"{t} {row['valid/' + t]:.3f}" for t in terms[1:])
        self.say(f"epoch {pos.epoch + 1}: train/loss {row['train/loss']:.3f}  valid/loss {row['valid/loss']:.3f} "
                 f"({parts})  {row['epoch_seconds']:.1f} s, {row['samples_per_second']:,.0f} samples/s")
        if epoch_done:
            pos.epoch, pos.batches_done = pos.epoch + 1, 0
            self.meter.start_epoch()
        self._save()


def _raise_if_compile_failed(e: Exception, step: int, device: str) -> None:
    """--compile's failure (no working compiler for inductor) as one line, at the first step."""
    from torch._dynamo.exc import BackendCompilerFailed  # InductorError is one
    if isinstance(e, BackendCompilerFailed):
        inner = getattr(e, "inner_exception", None) or e
        need = "triton and a C compiler" if device == "cuda" else "a C++ compiler (or set CXX)"
        raise TrainingError(f"--compile failed at step {step} ({type(inner).__name__}: {first_line(inner)}): "
                            f"install {need} or drop --compile") from None
