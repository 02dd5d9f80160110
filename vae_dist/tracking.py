"""W&B through Accelerate's tracker API, on the main process only, never blocking training.

Decides the W&B mode once (online falls back to offline without an API key, because
without a terminal W&B raises and with one it prompts while the other ranks wait),
and turns every W&B failure into one printed line: W&B being down never stops a run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from accelerate import Accelerator

from vae_dist.config import TrainingConfig
from vae_dist.errors import first_line

# WANDB_MODE values W&B itself accepts, as the mode they mean here.
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}
# Seconds W&B may take to start a run before training goes on without it (W&B's own
# default, 90 s, would hold every rank up that long when the server cannot be reached).
# W&B's WANDB_INIT_TIMEOUT, when the user sets it, wins.
INIT_TIMEOUT_SECONDS = 10.0


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


def wants_tracker(requested: Optional[str]) -> bool:
    """Whether the accelerator needs a W&B tracker at all (no messages, no key check)."""
    return requested_mode(requested) != "disabled"


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
            say(f"W&B did not close cleanly ({_first_line(e)})")


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


class Tracker:
    """Metrics and images to W&B from the main process; a no-op elsewhere or when disabled."""

    def __init__(self, accelerator: Accelerator, mode: str, say: Callable[[str], None] = print):
        self.accelerator = accelerator
        self.mode = mode
        self.say = say
        self.enabled = False
        self.run: Any = None

    def start(self, config: TrainingConfig, run_id: str, artifact_dir: Path) -> None:
        if self.mode == "disabled" or not self.accelerator.is_main_process:
            return
        init: dict[str, Any] = {
            "mode": self.mode,
            "id": run_id,
            "name": f"{Path(config.artifact_dir).name}-{run_id}",
            # "allow": a resumed run (same id) continues the same W&B run.
            "resume": "allow",
        }
        if not os.environ.get("WANDB_DIR"):
            init["dir"] = str(artifact_dir)
        try:
            settings = _bounded_settings(self.mode)
            if settings is not None:
                init["settings"] = settings
            self.accelerator.init_trackers(config.wandb_project, config=config.to_dict(), init_kwargs={"wandb": init})
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)
            if self.run is None:
                raise RuntimeError("no run was created")
            self.enabled = True
        except Exception as e:
            # A tracker whose start failed has no run: left in place, accelerate's
            # end_training() would call its finish() and fail the finished run.
            self.accelerator.trackers = []
            self.run = None
            self.say(f"W&B could not start ({_first_line(e)}); training continues without it")
            return
        where = getattr(self.run, "dir", None)
        self.say(f"W&B run {self.run.name} (id {self.run.id}, {self.mode})")
        if self.mode == "offline" and where:
            folder = Path(where).parent
            self.say(f"W&B offline run folder: {folder}; upload later with: wandb sync {folder}")

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            self.accelerator.log(values, step=step)
        except Exception as e:
            self.say(f"W&B log failed at step {step} ({_first_line(e)}); continuing")

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """images: {key: path of a PNG}."""
        if not self.enabled:
            return
        try:
            import wandb

            self.accelerator.log({k: wandb.Image(v) for k, v in images.items()}, step=step)
        except Exception as e:
            self.say(f"W&B image log failed at step {step} ({_first_line(e)}); continuing")

    def finish(self) -> None:
        if not self.enabled:
            return
        # Not accelerator.end_training(): that also destroys the process group, which
        # the run still needs to save the model.
        close_trackers(self.accelerator, self.say)
        self.enabled = False
