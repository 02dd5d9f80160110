"""The run's trackers (``--report-to``: W&B, TensorBoard) through Accelerate's tracker
classes, on the main process only, never blocking or failing training.

Decides the W&B mode once (online falls back to offline without an API key, because
without a terminal W&B raises and with one it prompts while the other ranks wait), and
turns every tracker failure into one printed line: a tracker being down never stops a run.
TensorBoard writes event files under the run folder (``tensorboard/``); a resumed run
continues them, hiding what the interrupted run logged after its checkpoint (purge_step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from vae_dist.config import TrainingConfig, flatten
from vae_dist.errors import ConfigError, first_line
from vae_dist.run.folder import TENSORBOARD

# WANDB_MODE values W&B itself accepts, as the mode they mean here.
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}
# Seconds W&B may take to start a run before training goes on without it (W&B's own
# default, 90 s, would hold every rank up that long when the server cannot be reached).
# W&B's WANDB_INIT_TIMEOUT, when the user sets it, wins.
INIT_TIMEOUT_SECONDS = 10.0
NAMES = {"wandb": "W&B", "tensorboard": "TensorBoard"}


def check_report_to(config: TrainingConfig) -> None:
    """Before the run folder is touched: a tracker asked for whose package is missing.
    (W&B is a dependency; TensorBoard an optional extra.)"""
    if "tensorboard" in config.report_to and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--report-to tensorboard needs the tensorboard package: pip install 'vae_dist[tensorboard]' "
            "(in a checkout: pip install -e '.[tensorboard]')"
        )


def has_wandb_api_key() -> bool:
    """True if W&B would find credentials without prompting."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib import wbauth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return bool(wbauth.read_netrc_auth(host=host))
    except Exception:
        return False


def requested_mode(requested: Optional[str]) -> str:
    """The mode asked for: an explicit value wins; None (not given) follows WANDB_MODE
    when it names a mode, else online."""
    if requested is not None:
        return requested
    return ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower(), "online")


def resolve_mode(requested: Optional[str], say: Callable[[str], None]) -> str:
    """The W&B mode to use: 'online', 'offline' or 'disabled'."""
    mode = requested_mode(requested)
    if mode == "online" and not has_wandb_api_key():
        say("W&B: no API key found (WANDB_API_KEY or `wandb login`); logging offline instead")
        return "offline"
    return mode


def _first_line(e: BaseException) -> str:
    text = first_line(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _bounded_settings(mode: str) -> Any:
    """wandb.Settings that keep a failing start short, or None to leave W&B's own."""
    import wandb

    if mode != "online":
        return None
    # Before the run starts, W&B asks the server who the key belongs to (for the "logged
    # in as" line), with its own 5 s timeout tried twice, outside init_timeout. Without it
    # an unreachable server costs 10 s more; the entity is still resolved by the server.
    try:
        wandb.setup(settings=wandb.Settings(x_disable_viewer=True))
    except Exception:
        pass
    if os.environ.get("WANDB_INIT_TIMEOUT"):
        return None
    return wandb.Settings(init_timeout=INIT_TIMEOUT_SECONDS)


def close_trackers(accelerator: Accelerator, say: Callable[[str], None] = print) -> None:
    """Finish every tracker the accelerator holds, each failure one line, and forget them,
    so that ``accelerator.end_training()`` has nothing left that could raise."""
    trackers, accelerator.trackers = list(accelerator.trackers), []
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as e:
            say(f"{NAMES.get(tracker.name, tracker.name)} did not close cleanly ({_first_line(e)})")


def _hparams(config: TrainingConfig) -> dict[str, Any]:
    """The config as TensorBoard's hparams take it: flat, and scalars only."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(config.to_dict()).items()}


def _quiet_writer_thread(args: Any) -> None:
    """threading.excepthook once TensorBoard writes: its writer thread keeps a write's error
    (a full disk) for the next call on the writer, which Tracker reports as one line, and
    also re-raises it, which threading would print as a traceback."""
    thread = type(args.thread)
    if thread.__name__ == "_AsyncWriterThread" and thread.__module__.startswith("tensorboard."):
        return
    _previous_excepthook(args)


_previous_excepthook = threading.excepthook


class Tracker:
    """Metrics and pictures to the trackers of ``--report-to``, from the main process; a
    no-op elsewhere or with none. The started trackers are the accelerator's own list, so
    that train()'s clean-up closes them whatever happens."""

    def __init__(self, accelerator: Accelerator, say: Callable[[str], None] = print):
        self.accelerator = accelerator
        self.say = say
        self.run: Any = None  # the W&B run, once started
        self._failed: set[str] = set()  # trackers whose failure was already said

    def start(self, config: TrainingConfig, run_id: str, artifact_dir: Path, first_step: int = 0) -> None:
        """Start each tracker asked for; ``first_step``: the step the run resumes from (0: new)."""
        if not self.accelerator.is_main_process:
            return
        if "wandb" in config.report_to:
            mode = resolve_mode(config.wandb_mode, self.say)
            if mode != "disabled":
                self._start("wandb", lambda: self._wandb(config, run_id, artifact_dir, mode))
        if "tensorboard" in config.report_to:
            self._start("tensorboard", lambda: self._tensorboard(config, artifact_dir, first_step))

    def _start(self, name: str, make: Callable[[], GeneralTracker]) -> None:
        try:
            tracker = make()
        except Exception as e:
            # A tracker whose start failed is not kept: end_training() would call its finish().
            self.say(f"{NAMES[name]} could not start ({_first_line(e)}); training continues without it")
            return
        self.accelerator.trackers.append(tracker)

    def _wandb(self, config: TrainingConfig, run_id: str, artifact_dir: Path, mode: str) -> GeneralTracker:
        init: dict[str, Any] = {
            "mode": mode,
            "id": run_id,
            "name": f"{Path(config.artifact_dir).name}-{run_id}",
            # "allow": a resumed run (same id) continues the same W&B run.
            "resume": "allow",
        }
        if not os.environ.get("WANDB_DIR"):
            init["dir"] = str(artifact_dir)
        settings = _bounded_settings(mode)
        if settings is not None:
            init["settings"] = settings
        tracker = WandBTracker(config.wandb_project, **init)
        tracker.start()
        if tracker.run is None:
            raise RuntimeError("no run was created")
        try:
            tracker.store_init_configuration(config.to_dict())
        except Exception:
            tracker.finish()
            raise
        self.run = tracker.run
        self.say(f"W&B run {self.run.name} (id {self.run.id}, {mode})")
        where = getattr(self.run, "dir", None)
        if mode == "offline" and where:
            folder = Path(where).parent
            self.say(f"W&B offline run folder: {folder}; upload later with: wandb sync {folder}")
        return tracker

    def _tensorboard(self, config: TrainingConfig, artifact_dir: Path, first_step: int) -> GeneralTracker:
        from torch.utils.tensorboard.summary import hparams

        # purge_step: what the interrupted run logged after the checkpoint this run resumes
        # from is hidden, so no step shows twice.
        tracker = TensorBoardTracker(TENSORBOARD, artifact_dir, purge_step=first_step + 1 if first_step else None)
        global _previous_excepthook
        if threading.excepthook is not _quiet_writer_thread:
            _previous_excepthook, threading.excepthook = threading.excepthook, _quiet_writer_thread
        tracker.start()
        writer = tracker.writer
        try:
            # Not store_init_configuration: it writes its hparams into a new folder per call.
            text = "    " + config.to_json().replace("\n", "\n    ")  # indented: a code block in the text plugin
            writer.add_text("config", text, global_step=first_step)
            for summary in hparams(_hparams(config), {"valid/loss": None}):
                writer.file_writer.add_summary(summary)
            writer.flush()
        except Exception:
            with contextlib.suppress(Exception):  # the first error is the one to say
                tracker.finish()
            raise
        return tracker

    def _each(self, what: str, step: int, call: Callable[[GeneralTracker], None]) -> None:
        for tracker in list(self.accelerator.trackers):
            try:
                call(tracker)
            except Exception as e:
                if tracker.name not in self._failed:  # one line per tracker, not one per step
                    self._failed.add(tracker.name)
                    self.say(f"{NAMES[tracker.name]} {what} failed at step {step} ({_first_line(e)}); "
                             "continuing (further failures not shown)")

    def log(self, values: dict[str, Any], step: int) -> None:
        self._each("log", step, lambda t: t.log(values, step=step))

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """images: {key: path of a PNG}."""
        def log(tracker: GeneralTracker) -> None:
            if tracker.name == "wandb":
                import wandb

                tracker.log({k: wandb.Image(v) for k, v in images.items()}, step=step)
            else:
                import numpy as np
                from PIL import Image

                pictures = {}
                for k, v in images.items():
                    with Image.open(v) as picture:
                        pictures[k] = np.asarray(picture.convert("RGB"))[None]
                tracker.log_images(pictures, step=step, dataformats="NHWC")
                tracker.writer.flush()

        self._each("image log", step, log)

    def record_results(self, model_path: Path, config: TrainingConfig, history: Sequence[dict[str, Any]],
                       results: dict[str, Any]) -> None:
        """After the export: the final and best valid/loss in the W&B run's summary, and the
        model as a W&B artifact (type model) with the config and results as its metadata."""
        if self.run is None or not history:
            return
        best = min(history, key=lambda r: r["valid/loss"])
        try:
            import wandb

            self.run.summary.update({
                "final/valid/loss": history[-1]["valid/loss"], "best/valid/loss": best["valid/loss"],
                "best/epoch": best["epoch"], "best/step": best["step"],
            })
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model",
                                      metadata={"config": config.to_dict(), "results": results})
            artifact.add_file(str(model_path), name=model_path.name)
            self.run.log_artifact(artifact)
        except Exception as e:
            self.say(f"W&B: the model artifact or summary was not logged ({_first_line(e)}); the model is saved")

    def finish(self) -> None:
        # Not accelerator.end_training(): that also destroys the process group, which
        # the run may still need.
        close_trackers(self.accelerator, self.say)
