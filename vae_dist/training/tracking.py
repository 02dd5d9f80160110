"""What a run shows: progress (a live bar on a terminal, else a line every few seconds), the summary table, and the
``--report-to`` trackers (W&B, TensorBoard) on the main process: a bounded start, each failure one line, never fatal."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from tqdm.auto import tqdm

from vae_dist.config import TrainingConfig, flatten
from vae_dist.errors import ConfigError, first_line
from vae_dist.run.fileio import print_err
from vae_dist.run.folder import TENSORBOARD

# WANDB_MODE values W&B itself accepts, as the mode they mean here.
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}
# Seconds W&B may take to start (its own default, 90 s, would hold every rank up); WANDB_INIT_TIMEOUT wins.
INIT_TIMEOUT_SECONDS = 10.0
NAMES = {"wandb": "W&B", "tensorboard": "TensorBoard"}
# Steps of an epoch left out of the time left: they hold its warm-up (allocations, --compile's compilation).
WARMUP_STEPS = 3


def check_report_to(config: TrainingConfig) -> None:
    """Before the run folder is touched: TensorBoard (an optional extra) asked for but not installed."""
    if "tensorboard" in config.report_to and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install 'vae_dist[tensorboard]' "
                          "(in a checkout: pip install -e '.[tensorboard]')")


def has_wandb_api_key() -> bool:  # without prompting
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib import wbauth
        return bool(wbauth.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:
        return False


def resolve_mode(requested: Optional[str], say: Callable[[str], None]) -> str:
    """'online', 'offline' or 'disabled': the flag, else WANDB_MODE when it names a mode, else online; online
    without an API key is offline (without a terminal W&B raises, with one it prompts while the ranks wait)."""
    mode = requested or ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower(), "online")
    if mode == "online" and not has_wandb_api_key():
        say("W&B: no API key found (WANDB_API_KEY or `wandb login`); logging offline instead")
        return "offline"
    return mode


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {text}" if (text := first_line(e)) else type(e).__name__


def close_trackers(accelerator: Accelerator, say: Callable[[str], None] = print) -> None:
    """Finish and forget every tracker the accelerator holds, each failure one line, so that
    ``accelerator.end_training()`` has nothing left that could raise."""
    trackers, accelerator.trackers = list(accelerator.trackers), []
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as e:
            say(f"{NAMES.get(tracker.name, tracker.name)} did not close cleanly ({_why(e)})")


def _quiet_writer_thread(args: Any) -> None:
    """threading.excepthook: TensorBoard's writer thread re-raises a write's error (a full disk), which the
    next call on the writer raises too (one line from Tracker); threading would print it as a traceback."""
    thread = type(args.thread)
    if not (thread.__name__ == "_AsyncWriterThread" and thread.__module__.startswith("tensorboard.")):
        _previous_excepthook(args)


_previous_excepthook = threading.excepthook


class Tracker:
    """Metrics and pictures to the trackers of ``--report-to`` from the main process; a no-op elsewhere.
    The started trackers are the accelerator's own list, so that train()'s clean-up closes them."""

    def __init__(self, accelerator: Accelerator, say: Callable[[str], None] = print):
        self.accelerator, self.say = accelerator, say
        self.run: Any = None  # the W&B run, once started
        self._failed: set[str] = set()  # trackers whose failure was already said

    def start(self, config: TrainingConfig, run_id: str, artifact_dir: Path, first_step: int = 0) -> None:
        """Start each tracker asked for; ``first_step``: the step the run resumes from (0: new)."""
        if not self.accelerator.is_main_process:
            return
        if "wandb" in config.report_to and (mode := resolve_mode(config.wandb_mode, self.say)) != "disabled":
            self._start("wandb", lambda: self._wandb(config, run_id, artifact_dir, mode))
        if "tensorboard" in config.report_to:
            self._start("tensorboard", lambda: self._tensorboard(config, artifact_dir, first_step))

    def _start(self, name: str, make: Callable[[], GeneralTracker]) -> None:
        try:  # a tracker whose start failed is not kept: end_training() would call its finish()
            self.accelerator.trackers.append(make())
        except Exception as e:
            self.say(f"{NAMES[name]} could not start ({_why(e)}); training continues without it")

    def _wandb(self, config: TrainingConfig, run_id: str, artifact_dir: Path, mode: str) -> GeneralTracker:
        import wandb
        # "allow": a resumed run (same id) continues the same W&B run.
        init: dict[str, Any] = {"mode": mode, "id": run_id, "name": f"{Path(config.artifact_dir).name}-{run_id}",
                                "resume": "allow", "dir": os.environ.get("WANDB_DIR") or str(artifact_dir)}
        # W&B's own lines (about 30 a run: banner, history, summary, sync hint) unless WANDB_SILENT or WANDB_QUIET
        # asks for them: the lines said below name the run, its folder and its sync command. Warnings still show.
        settings: dict[str, Any] = {} if {"WANDB_SILENT", "WANDB_QUIET"} & os.environ.keys() else {"silent": True}
        if mode == "online":
            # W&B asks the server who the key belongs to (5 s, twice) outside init_timeout: not needed.
            with contextlib.suppress(Exception):
                wandb.setup(settings=wandb.Settings(x_disable_viewer=True))
            if not os.environ.get("WANDB_INIT_TIMEOUT"):
                settings["init_timeout"] = INIT_TIMEOUT_SECONDS
        if settings:
            init["settings"] = wandb.Settings(**settings)
        tracker = WandBTracker(config.wandb_project, **init)
        tracker.start()
        try:
            tracker.store_init_configuration(config.to_dict())
        except Exception:
            tracker.finish()
            raise
        self.run = tracker.run
        url = f": {self.run.url}" if mode == "online" else ""  # W&B's own line with it is silenced
        self.say(f"W&B run {self.run.name} (id {self.run.id}, {mode}){url}")
        if mode == "offline" and (where := getattr(self.run, "dir", None)):
            folder = Path(where).parent
            self.say(f"W&B offline run folder: {folder}; upload later with: wandb sync {folder}")
        return tracker

    def _tensorboard(self, config: TrainingConfig, artifact_dir: Path, first_step: int) -> GeneralTracker:
        from torch.utils.tensorboard.summary import hparams
        # purge_step: what the interrupted run logged after this run's checkpoint is hidden (no step twice).
        tracker = TensorBoardTracker(TENSORBOARD, artifact_dir, purge_step=first_step + 1 if first_step else None)
        global _previous_excepthook
        if threading.excepthook is not _quiet_writer_thread:
            _previous_excepthook, threading.excepthook = threading.excepthook, _quiet_writer_thread
        tracker.start()
        try:  # not store_init_configuration: it writes its hparams into a new folder per call
            text = "    " + config.to_json().replace("\n", "\n    ")  # indented: a code block in the text plugin
            tracker.writer.add_text("config", text, global_step=first_step)
            flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                    for k, v in flatten(config.to_dict()).items()}
            for summary in hparams(flat, {"valid/loss": None}):
                tracker.writer.file_writer.add_summary(summary)
            tracker.writer.flush()
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
                    self.say(f"{NAMES[tracker.name]} {what} failed at step {step} ({_why(e)}); "
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
                from PIL import Image  # a file opened by name is closed once loaded (convert loads it)
                pictures = {k: np.asarray(Image.open(v).convert("RGB"))[None] for k, v in images.items()}
                tracker.log_images(pictures, step=step, dataformats="NHWC")
                tracker.writer.flush()
        self._each("image log", step, log)

    def record_results(self, model_path: Path, config: TrainingConfig, history: Sequence[dict[str, Any]],
                       results: dict[str, Any]) -> None:
        """After the export: the final and best valid/loss in the W&B run's summary, and the model as a
        W&B artifact (type model) with the config and results as its metadata."""
        if self.run is None:
            return
        best = min(history, key=lambda r: r["valid/loss"])
        try:
            import wandb
            self.run.summary.update({"final/valid/loss": history[-1]["valid/loss"], "best/epoch": best["epoch"],
                                     "best/valid/loss": best["valid/loss"], "best/step": best["step"]})
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model",
                                      metadata={"config": config.to_dict(), "results": results})
            artifact.add_file(str(model_path), name=model_path.name)
            self.run.log_artifact(artifact)
        except Exception as e:
            self.say(f"W&B: the model artifact or summary was not logged ({_why(e)}); the model is saved")


class Progress:
    """An epoch's progress with the time the run has left: ``run_steps`` (its steps left from ``initial``, this
    epoch's and later ones') at the rate of this epoch's steps after its first WARMUP_STEPS, plus ``fixed_seconds``
    (the validations to come). Until then it says that the time left is being estimated."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool, run_steps: Optional[int] = None,
                 fixed_seconds: float = 0.0, line_every: float = 30.0):
        self.desc, self.total, self.done, self.initial = desc, total, initial, initial
        self.run_steps = total - initial if run_steps is None else run_steps
        self.enabled, self.line_every, self.postfix, self.fixed_seconds = enabled, line_every, "", fixed_seconds
        self.last_line = time.perf_counter()
        self.timed_from = 0.0  # when the first WARMUP_STEPS were done
        try:  # a stream that is not there, or closed, is no terminal
            live = enabled and bool(sys.stderr.isatty())
        except (AttributeError, ValueError, OSError):
            live = False
        # Without tqdm's own time left, which would be the epoch's.
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]") if live else None

    def step(self) -> None:
        self.done += 1
        if self.done - self.initial == WARMUP_STEPS:
            self.timed_from = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done == self.initial + 1  # the first step too: training is under way
                               or time.perf_counter() - self.last_line >= self.line_every):
            self.last_line = time.perf_counter()
            print_err(f"{self.desc}: {self.done}/{self.total}{self.postfix}, {self.left()}")

    def left(self) -> str:
        timed = self.done - self.initial - WARMUP_STEPS
        if timed < 1:
            return "estimating the time left"
        seconds = (time.perf_counter() - self.timed_from) / timed * (self.run_steps - self.done + self.initial)
        return f"{_duration(seconds + self.fixed_seconds)} left in the run"

    def report(self, loss: float, samples_per_second: float) -> None:
        self.postfix = f", loss {loss:.2f}, {samples_per_second:,.0f} samples/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.postfix[2:]}, {self.left()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def format_summary(history: list[dict[str, Any]], terms: Sequence[str]) -> str:
    """A table, one row per epoch and one column per train/ and valid/ loss term (the best, lowest, objective
    marked '*' and the worst '!'; the other terms are its parts, whose lowest is no better: a KL near 0 is a
    collapsed posterior), then the family's whole-test-set metrics (valid/codes_used, ...)."""
    if not history:
        return "no epochs completed"
    keys = [k for k in (f"{s}/{t}" for s in ("train", "valid") for t in terms) if any(k in row for row in history)]
    whole = [k for k in history[-1] if k.startswith("valid/") and k not in keys and k != "valid/samples"]
    marks: dict[tuple[int, str], str] = {}
    for key in ("train/loss", "valid/loss"):
        vals = [(row[key], i) for i, row in enumerate(history) if key in row]
        if len(vals) > 1:
            marks[(min(vals)[1], key)], marks[(max(vals)[1], key)] = "*", "!"
    header = ["epoch", "step", *keys, *whole]
    rows = [[str(row.get("epoch", i + 1)), str(row.get("step", "")),
             *(f"{row[k]:.3f}{marks.get((i, k), ' ')}" if k in row else "-" for k in keys),
             *(f"{row[k]:.3f}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in whole)]
            for i, row in enumerate(history)]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |" for cells in [header] + rows]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join(["Summary (nats per image; * best, ! worst loss)", lines[0], sep, *lines[1:]])
