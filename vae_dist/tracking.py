"""W&B through Accelerate's tracker API, on the main process only, never blocking training.

Decides the W&B mode once (online falls back to offline without an API key, because
without a terminal W&B raises and with one it prompts while the other ranks wait),
and turns every W&B failure into one printed line: W&B being down never stops a run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from vae_dist.config import TrainingConfig


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except Exception:
        return False
    return True


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


def resolve_mode(requested: str, say: Callable[[str], None]) -> str:
    """The W&B mode to use: 'online', 'offline' or 'disabled'."""
    if requested == "disabled":
        return "disabled"
    if not wandb_available():
        say("W&B is not installed; metrics go to metrics.jsonl only (pip install wandb to log runs)")
        return "disabled"
    if requested == "online" and not has_wandb_api_key():
        say("W&B: no API key found (WANDB_API_KEY or `wandb login`); logging offline instead")
        return "offline"
    return requested


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
            self.accelerator.init_trackers(config.wandb_project, config=config.to_dict(), init_kwargs={"wandb": init})
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)
            self.enabled = True
        except Exception as e:
            self.say(f"W&B could not start ({type(e).__name__}: {e}); training continues without it")
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
            self.say(f"W&B log failed at step {step} ({type(e).__name__}: {e}); continuing")

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """images: {key: PIL image}."""
        if not self.enabled:
            return
        try:
            import wandb

            self.accelerator.log({k: wandb.Image(v) for k, v in images.items()}, step=step)
        except Exception as e:
            self.say(f"W&B image log failed at step {step} ({type(e).__name__}: {e}); continuing")

    def finish(self) -> None:
        if not self.enabled:
            return
        try:
            # Not accelerator.end_training(): that also destroys the process group, which
            # the run still needs to save the model.
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
        except Exception as e:
            self.say(f"W&B did not close cleanly ({type(e).__name__}: {e})")
        self.enabled = False

