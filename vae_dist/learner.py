"""The Learner: ``fit`` orders epochs, train steps, validation, logging and checkpoints.

``train_step`` owns one optimizer step; ``fit`` only orders step -> log -> validate ->
checkpoint. Metrics are accumulated on the device as sums and reduced across ranks only
when they are reported, so a step never waits for the host (no ``.item()`` per step).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vae_dist import artifacts, images
from vae_dist.checkpoint import Checkpointer
from vae_dist.config import LossConfig, TrainingConfig
from vae_dist.distributed import any_rank, main_print
from vae_dist.errors import TrainingError
from vae_dist.loss import negative_elbo
from vae_dist.model import VAE
from vae_dist.noise import eval_noise, train_noise
from vae_dist.signals import Preempted, StopRequest
from vae_dist.tracking import Tracker

# How often ranks agree on a stop request when there are several: each agreement is an
# all-reduce and a host sync, so it is not done every step.
STOP_SYNC_EVERY = 10
# Test hook: "R:S" raises on rank R at global step S (one rank's failure must end the job);
# "R:S:kill" SIGKILLs that rank there instead (a kill at a chosen moment, for resume tests).
FAIL_HOOK_ENV = "VAE_DIST_TEST_FAIL_AT"
# Test hook: "N" multiplies the batch of the N-th optimizer step (1-based, the number that
# errors and checkpoint folders use) by NaN on every rank, to test non-finite detection.
NAN_HOOK_ENV = "VAE_DIST_TEST_NAN_AT"
# A unit is "active" when its posterior mean varies over the data (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01
NUM_PREVIEW = 32


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    images_batch: torch.Tensor,
    eps: torch.Tensor,
    *,
    recon_loss: str,
    kl_weight: float,
    max_grad_norm: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, clip, Adam step. Returns (sums, loss) still on the device:
    sums = [sum of per-image objective, sum of recon, sum of kl] over this rank's batch."""
    out = model(images_batch, eps)
    parts = negative_elbo(out.logits, out.mu, out.logvar, images_batch, kind=recon_loss, kl_weight=kl_weight)
    accelerator.backward(parts.loss)
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # One stack and one reduction: per-step bookkeeping is a visible share of a 3 ms CPU step.
    sums = torch.stack([parts.total.detach(), parts.recon.detach(), parts.kl.detach()]).sum(dim=1)
    return sums, parts.loss.detach()


def stepping_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer ``train_step`` calls. Accelerate's wrapper adds something only with a
    gradient scaler (fp16), gradient accumulation or XLA; otherwise its step() and zero_grad()
    just forward, after looking for the lomo_optim package and inspecting zero_grad's
    signature on every call: about 0.1 ms of a 3.5 ms MLP step on the 2-core CPU. The torch
    optimizer is the same object either way, so checkpoints (through the wrapper) see it."""
    if (
        isinstance(optimizer, AcceleratedOptimizer)
        and optimizer.scaler is None
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.distributed_type != DistributedType.XLA
    ):
        return optimizer.optimizer
    return optimizer


@torch.no_grad()
def validate(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, noise: torch.Tensor, loss: LossConfig
) -> dict[str, float]:
    """Exact sample-weighted means over the whole test split, at any process count.

    ``gather_for_metrics`` per batch drops the samples Accelerate repeats to even out
    the last round, so every test sample is counted exactly once; each sample's noise is
    ``noise[index]``, the same whichever rank holds it.
    """
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    mus: list[torch.Tensor] = []
    for images_batch, index in loader:
        out = model(images_batch, noise[index])
        p = negative_elbo(out.logits, out.mu, out.logvar, images_batch, kind=loss.recon_loss, kl_weight=loss.kl_weight)
        per_sample, mu = accelerator.gather_for_metrics((torch.stack([p.total, p.recon, p.kl], dim=1), out.mu.float()))
        rows.append(per_sample)
        mus.append(mu)
    model.train(was_training)
    per_sample = torch.cat(rows).double()  # (N, 3): summed in float64 so the order of ranks does not matter
    mu = torch.cat(mus)
    means = per_sample.mean(dim=0).tolist()
    active = int((mu.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum().item()) if mu.shape[0] > 1 else 0
    return {
        "valid/loss": means[0],
        "valid/recon": means[1],
        "valid/kl": means[2],
        "valid/active_units": active,
        "valid/samples": int(per_sample.shape[0]),
    }


@dataclass
class Position:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    batches_done: int = 0  # optimizer steps already taken in that epoch
    global_step: int = 0
    train_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # partial epoch, all ranks
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_run_id: Optional[str] = None


class _Interval:
    """The training loss since the last report, from the running sums: a snapshot at each
    report instead of a second accumulator updated every step."""

    def __init__(self, metric_sums: torch.Tensor, count: float):
        self.objective, self.count = metric_sums[0].clone(), count

    def take(self, metric_sums: torch.Tensor, count: float) -> torch.Tensor:
        """[objective sum, images] since the previous take (or the start); starts a new interval."""
        now = metric_sums[0].clone()
        out = torch.stack([now - self.objective, torch.full_like(now, count - self.count)])
        self.objective, self.count = now, count
        return out


class Learner:
    """Trains a VAE with Accelerate: prepare, fit, validate, checkpoint, summarise."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: VAE,
        optimizer: torch.optim.Optimizer,
        config: TrainingConfig,
        *,
        artifact_dir: Path,
        tracker: Tracker,
        checkpointer: Checkpointer,
        resume: bool = False,
        run_id: str = "",
        preview_images: Optional[torch.Tensor] = None,
    ):
        self.acc = accelerator
        self.model: nn.Module = model
        self.optimizer = optimizer
        self.config = config
        self.artifact_dir = artifact_dir
        self.tracker = tracker
        self.checkpointer = checkpointer
        self.resume = resume
        self.run_id = run_id
        self.preview_images = preview_images
        self.say: Callable[[str], None] = main_print(accelerator)
        self.position = Position(wandb_run_id=run_id)
        self.latent = model.latent_size
        # Test hooks, read once: the step loop should not consult the environment.
        self._fail_at = os.environ.get(FAIL_HOOK_ENV)
        self._nan_at = os.environ.get(NAN_HOOK_ENV)
        # (global step, loss) of the steps not yet checked for a non-finite loss.
        self._unchecked_losses: list[tuple[int, torch.Tensor]] = []

    # ----------------------------------------------------------------- fit

    def fit(self, train_loader: DataLoader, valid_loader: DataLoader) -> nn.Module:
        """Train for ``config.epochs`` (or ``max_steps``); returns the trained (unwrapped) model."""
        cfg, acc = self.config, self.acc
        sampler = train_loader.sampler  # EpochShuffleSampler: the order is a function of (seed, epoch)
        num_train = len(train_loader.dataset)  # type: ignore[arg-type]
        self.model, self.optimizer, train_loader, valid_loader = acc.prepare(
            self.model, self.optimizer, train_loader, valid_loader
        )
        self.step_optimizer = stepping_optimizer(acc, self.optimizer)
        self.valid_noise = eval_noise(cfg.seed, len(valid_loader.dataset), self.latent).to(acc.device)  # type: ignore[arg-type]
        steps_per_epoch = self.steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise TrainingError(
                f"the training set is smaller than one global batch ({cfg.data.batch_size} x {acc.num_processes}"
                " processes); lower --batch-size or raise --limit-train-samples"
            )
        if self.resume:
            self._restore(steps_per_epoch)
        pos = self.position
        self.tracker.start(cfg, pos.wandb_run_id or self.run_id, self.artifact_dir)

        with StopRequest() as stop:
            while pos.epoch < cfg.epochs and not self._max_steps_reached():
                sums, train_seconds, samples, stopped_by = self._train_epoch(train_loader, sampler, num_train, stop)
                if stopped_by is not None:
                    self._check_finite()
                    path = self._checkpoint(sums)
                    self.tracker.finish()
                    raise Preempted(stopped_by, str(path))
                epoch_done = pos.batches_done >= steps_per_epoch
                if not epoch_done and not self._max_steps_reached():
                    # Would otherwise loop on the same epoch for ever.
                    raise TrainingError(
                        f"the training loader ended after {pos.batches_done} of {steps_per_epoch} batches"
                    )
                self._end_epoch(sums, valid_loader, train_seconds, samples, epoch_done)

        self.tracker.finish()
        return acc.unwrap_model(self.model)

    # ------------------------------------------------------------ pieces

    def _fault_hook(self, step: int) -> None:
        if not self._fail_at:
            return
        rank, at, *kind = self._fail_at.split(":")
        if int(rank) == self.acc.process_index and int(at) == step:
            if kind == ["kill"]:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"test fault injected on rank {rank} at step {step}")

    def _restore(self, steps_per_epoch: int) -> None:
        """Load the newest usable checkpoint into the prepared objects and take its position."""
        acc = self.acc
        found = self.checkpointer.load_latest()
        if found is not None:
            state = dict(found.state)
            # Mid-epoch, batches_done counts global batches of the saving run's size.
            saved_world = state.pop("num_processes", acc.num_processes)
            if state["batches_done"] and saved_world != acc.num_processes:
                raise TrainingError(
                    f"cannot resume mid-epoch from {found.path.name} with {acc.num_processes} process(es): it was "
                    f"written by {saved_world}; resume with {saved_world} (a different count can resume at an epoch end)"
                )
            self.position = Position(**state)
            self.say(
                f"resumed from {found.path.name}: epoch {self.position.epoch + 1}, "
                f"batch {self.position.batches_done}/{steps_per_epoch}, step {self.position.global_step}"
            )
        else:
            self.say("--resume: no checkpoint written yet; starting from step 0")

    def _train_epoch(
        self, train_loader: DataLoader, sampler: Any, num_train: int, stop: StopRequest
    ) -> tuple[torch.Tensor, float, int, Optional[int]]:
        """Optimizer steps until the epoch ends, max_steps, or an agreed stop request.

        Returns (this rank's sums [objective, recon, kl, count], seconds, samples seen by
        all ranks, the stop signal or None)."""
        cfg, acc, pos = self.config, self.acc, self.position
        epoch, steps_per_epoch = pos.epoch, self.steps_per_epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)  # type: ignore[attr-defined]
        noise = train_noise(cfg.seed, epoch, num_train, self.latent).to(acc.device)
        # Resuming mid-epoch: the same permutation, minus the batches already done.
        loader = acc.skip_first_batches(train_loader, pos.batches_done) if pos.batches_done else train_loader
        # Sums of this rank's samples; a resumed partial epoch's totals sit on rank 0. Per step
        # only the three metric sums change on the device (one in-place add); the sample count
        # is kept here and written into sums[3] whenever sums leaves this method.
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)
        count = 0.0
        if acc.is_main_process:
            sums[:3] += torch.tensor(pos.train_sums[:3], dtype=torch.float64, device=acc.device)
            count = pos.train_sums[3]
        metric_sums = sums[:3]  # a view: adding to it adds to sums

        def totals() -> torch.Tensor:
            sums[3] = count
            return sums

        interval = _Interval(metric_sums, count)
        bar = tqdm(
            total=steps_per_epoch,
            initial=pos.batches_done,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            leave=False,
        )
        t0 = time.perf_counter()
        samples = 0
        try:
            for images_batch, index in loader:
                self._fault_hook(pos.global_step)
                eps = noise[index]  # each sample's own noise, wherever it landed
                if self._nan_at == str(pos.global_step + 1):
                    images_batch = images_batch * float("nan")
                step_sums, loss = train_step(
                    self.model,
                    self.step_optimizer,
                    acc,
                    images_batch,
                    eps,
                    recon_loss=cfg.loss.recon_loss,
                    kl_weight=self._kl_weight(pos.global_step, steps_per_epoch),
                    max_grad_norm=cfg.optimizer.max_grad_norm,
                )
                n = images_batch.shape[0]
                metric_sums += step_sums
                count += n
                pos.global_step += 1
                # Checked for non-finite values at the next report, without a host sync now.
                self._unchecked_losses.append((pos.global_step, loss))
                pos.batches_done += 1
                samples += n * acc.num_processes
                bar.update(1)
                if pos.global_step % cfg.log_every_steps == 0:
                    self._log_interval(interval.take(metric_sums, count), bar, samples / (time.perf_counter() - t0))
                if self._stop_agreed(stop, pos.global_step):
                    return totals(), time.perf_counter() - t0, samples, stop.signum
                if self._max_steps_reached():
                    break
                # The end of an epoch (or of the run) is checkpointed by _end_epoch.
                if (
                    cfg.checkpoint_every_steps
                    and pos.global_step % cfg.checkpoint_every_steps == 0
                    and pos.batches_done < steps_per_epoch
                ):
                    self._checkpoint(totals())
        finally:
            bar.close()  # also on errors, so the message does not land on the bar's line
        return totals(), time.perf_counter() - t0, samples, None

    def _kl_weight(self, step: int, steps_per_epoch: int) -> float:
        """Linear KL warm-up from 0 to kl_weight over kl_warmup_epochs; a function of the
        step alone, so a resumed run gets the same weights."""
        w, warm = self.config.loss.kl_weight, self.config.loss.kl_warmup_epochs
        if warm <= 0:
            return w
        return w * min(1.0, step / (warm * steps_per_epoch))

    def _max_steps_reached(self) -> bool:
        m = self.config.max_steps
        return m is not None and self.position.global_step >= m

    def _stop_agreed(self, stop: StopRequest, step: int) -> bool:
        if self.acc.num_processes == 1:
            return stop.requested
        if step % STOP_SYNC_EVERY:
            return False
        return any_rank(self.acc, stop.requested)

    def _check_finite(self) -> None:
        """Raise on every rank if any rank saw a non-finite loss; names the first such step."""
        pending, self._unchecked_losses = self._unchecked_losses, []
        first_bad = torch.full((1,), -1, dtype=torch.long, device=self.acc.device)
        if pending:
            steps = torch.tensor([s for s, _ in pending], device=self.acc.device)
            bad = ~torch.isfinite(torch.stack([loss for _, loss in pending]))
            first_bad = torch.where(bad.any(), steps[bad.int().argmax()], first_bad)
        bad = self.acc.gather(first_bad)
        bad = bad[bad >= 0]
        if bad.numel():
            last = self.checkpointer.complete()
            kept = f"; the last good checkpoint {last[0].path} is kept" if last else ""
            raise TrainingError(f"loss became non-finite at step {int(bad.min())}{kept}")

    def _log_interval(self, interval: torch.Tensor, bar: Any, samples_per_second: float) -> None:
        """interval = [sum of the per-image objective, images] since the last report, this rank."""
        self._check_finite()
        total = self.acc.reduce(interval, reduction="sum") if self.acc.num_processes > 1 else interval
        loss = (total[0] / total[1].clamp_min(1)).item()
        bar.set_postfix(loss=f"{loss:.2f}", samples_s=f"{samples_per_second:,.0f}")
        self.tracker.log({"train/step_loss": loss}, step=self.position.global_step)

    def _reduced_train_sums(self, sums: torch.Tensor) -> list[float]:
        total = self.acc.reduce(sums.clone(), reduction="sum") if self.acc.num_processes > 1 else sums
        return [float(v) for v in total.tolist()]

    def _checkpoint(self, sums: torch.Tensor) -> Path:
        self._check_finite()
        pos = self.position
        pos.train_sums = self._reduced_train_sums(sums)
        state = {**dataclasses.asdict(pos), "num_processes": self.acc.num_processes}
        return self.checkpointer.save(pos.global_step, state)

    def _end_epoch(
        self, sums: torch.Tensor, valid_loader: DataLoader, train_seconds: float, samples: int, epoch_done: bool
    ) -> None:
        pos, acc = self.position, self.acc
        self._check_finite()
        total, recon, kl, count = self._reduced_train_sums(sums)
        t0 = time.perf_counter()
        valid = self.validate(valid_loader)
        valid_seconds = time.perf_counter() - t0
        row: dict[str, Any] = {
            "epoch": pos.epoch + 1,
            "step": pos.global_step,
            "complete_epoch": epoch_done,
            "train/loss": total / max(count, 1),
            "train/recon": recon / max(count, 1),
            "train/kl": kl / max(count, 1),
            "train/samples": int(count),
            **valid,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/kl_weight": self._kl_weight(pos.global_step, self.steps_per_epoch),
            "epoch_seconds": train_seconds + valid_seconds,
            "valid_seconds": valid_seconds,
            "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
        }
        # A partial epoch's row (max_steps) is replaced when the epoch is finished later.
        pos.history = [r for r in pos.history if r["epoch"] != row["epoch"]] + [row]
        if acc.is_main_process:
            artifacts.write_metrics(self.artifact_dir, pos.history)
        self.tracker.log({k: v for k, v in row.items() if k not in ("epoch", "step", "complete_epoch")}, step=pos.global_step)
        self._previews(pos.epoch + 1, pos.global_step)
        self.say(
            f"epoch {pos.epoch + 1}: train/loss {row['train/loss']:.3f}  valid/loss {row['valid/loss']:.3f} "
            f"(recon {row['valid/recon']:.3f}, kl {row['valid/kl']:.3f})  {row['epoch_seconds']:.1f} s, "
            f"{row['samples_per_second']:,.0f} samples/s"
        )
        if epoch_done:
            pos.epoch += 1
            pos.batches_done = 0
            sums.zero_()
        self._checkpoint(sums)

    def validate(self, valid_loader: DataLoader) -> dict[str, float]:
        return validate(self.acc, self.model, valid_loader, self.valid_noise, self.config.loss)

    @torch.no_grad()
    def _previews(self, epoch: int, step: int) -> None:
        """Test images beside their reconstructions, and samples from the prior, as PNGs
        under images/ and in W&B. Main process only, on the unwrapped model: no collective."""
        if not self.acc.is_main_process or self.preview_images is None:
            return
        model = self.acc.unwrap_model(self.model)
        model.eval()
        device = next(model.parameters()).device
        x = self.preview_images.to(device)
        recon = torch.sigmoid(model.decode(model.encode(x)[0]).float())  # decode the posterior mean
        z = torch.randn(64, self.latent, generator=torch.Generator().manual_seed(self.config.seed)).to(device)
        samples = torch.sigmoid(model.decode(z).float())
        model.train()
        pictures = {
            "valid/reconstructions": images.side_by_side(x.cpu(), recon.cpu()),
            # Not "valid/samples": that key is the validation sample count.
            "prior/samples": images.image_grid(samples.cpu(), nrow=8),
        }
        for key, picture in pictures.items():
            images.save_png(picture, self.artifact_dir / artifacts.IMAGES / f"epoch-{epoch:03d}-{key.split('/')[1]}.png")
        self.tracker.log_images(pictures, step=step)
