"""The W&B mode (flag, else $WANDB_MODE, else online; offline without a key) and W&B
failing to start costing a run neither its result nor more than a few seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from accelerate import Accelerator

from conftest import check_ok, main_in_process, output, small_train_args
from vae_dist.training import tracking
from vae_dist.config import TrainingConfig

UNSET = object()


@pytest.mark.parametrize(
    "flag, env, has_key, mode",
    [
        (None, "disabled", True, "disabled"),
        (None, "DISABLED", True, "disabled"),
        (None, "offline", True, "offline"),
        (None, "dryrun", True, "offline"),
        (None, UNSET, True, "online"),
        (None, "", True, "online"),
        (None, "sometimes", True, "online"),
        ("online", "disabled", True, "online"),  # the flag wins
        ("offline", "disabled", True, "offline"),
    ],
)
def test_the_mode_is_the_flag_else_wandb_mode_else_online(flag, env, has_key, mode, monkeypatch):
    if env is UNSET:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setattr(tracking, "has_wandb_api_key", lambda: has_key)
    said: list[str] = []
    assert tracking.resolve_mode(flag, said.append) == mode
    assert said == []


def test_online_without_an_api_key_logs_offline_and_says_so(monkeypatch):
    monkeypatch.setattr(tracking, "has_wandb_api_key", lambda: False)
    said: list[str] = []
    assert tracking.resolve_mode("online", said.append) == "offline"
    assert len(said) == 1 and "API key" in said[0]


@pytest.mark.parametrize(
    "report_to, env, started",
    [("wandb", "disabled", []), ("none", "offline", []), ("tensorboard", "offline", ["tensorboard"])],
)
def test_only_the_trackers_report_to_names_start(report_to, env, started, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", env)
    acc = Accelerator(cpu=True)
    tracker = tracking.Tracker(acc)
    try:
        tracker.start(TrainingConfig.from_dict({"report_to": report_to}), "abcd1234", tmp_path)
        assert [t.name for t in acc.trackers] == started
        assert tracker.run is None  # no W&B run
    finally:
        tracking.close_trackers(acc)
        acc.end_training()
    assert acc.trackers == []


# Two ways W&B cannot start: a malformed key (refused at once) and a well-formed key with
# no server reachable (W&B's own start timeout is 90 s).
BOGUS_KEYS = {"malformed": "abc123", "unreachable": "0123456789abcdef" * 2 + "01234567"}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(BOGUS_KEYS))
def test_wandb_failing_at_start_neither_fails_nor_holds_up_the_run(key, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", BOGUS_KEYS[key])
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # A server that refuses at once stands in for "no network" on machines that have one.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    monkeypatch.setattr(tracking, "INIT_TIMEOUT_SECONDS", 1.0)  # ours, not W&B's 90 s, is what bounds the wait
    acc = Accelerator(cpu=True)
    said: list[str] = []
    tracker = tracking.Tracker(acc, said.append)
    t0 = time.monotonic()
    try:
        tracker.start(TrainingConfig(wandb_mode="online"), "abcd1234", tmp_path)
        seconds = time.monotonic() - t0
        assert len(said) == 1 and "training continues without it" in said[0], said
        assert acc.trackers == []  # no tracker kept: nothing left for end_training() to fail on
        tracker.log({"train/loss": 1.0}, step=1)
        tracking.close_trackers(acc, said.append)
        assert len(said) == 1
    finally:
        acc.end_training()
        wandb.teardown()
    assert seconds < 30, f"W&B held the run up {seconds:.0f} s"


@pytest.mark.slow
def test_wandb_mode_disabled_in_the_environment_is_followed(data_dir: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    art = tmp_path / "run"
    args = small_train_args(data_dir, art, "--model", "mlp", "--hidden-sizes", "8", "--latent-size", "2",
                            "--limit-train-samples", "64", "--batch-size", "32", "--limit-eval-samples", "100")
    i = args.index("--wandb-mode")
    del args[i : i + 2]  # the mode left at its default
    ran = main_in_process(args, capsys)
    check_ok(ran)
    assert "W&B" not in output(ran)
    assert (art / "model.safetensors").is_file() and not (art / "wandb").exists()


def test_a_tensorboard_that_cannot_write_costs_one_line_and_no_traceback(tmp_path, monkeypatch):
    import threading

    printed: list = []  # what threading would print as a traceback
    monkeypatch.setattr(threading, "excepthook", printed.append)
    acc = Accelerator(cpu=True)
    said: list[str] = []
    tracker = tracking.Tracker(acc, said.append)
    tracker.start(TrainingConfig.from_dict({"report_to": "tensorboard"}), "abcd1234", tmp_path)
    (events,) = (tmp_path / "tensorboard").iterdir()
    events.unlink()
    events.symlink_to("/dev/full")  # TensorBoard opens the file by name at each write: a full disk from here on
    try:
        for step in (1, 2, 3):
            tracker.log({"train/loss": 1.0}, step=step)
        tracking.close_trackers(acc, said.append)
    finally:
        acc.end_training()
    assert [line.split(" (")[0] for line in said] == ["TensorBoard log failed at step 1", "TensorBoard did not close cleanly"]
    assert printed == []


def _progress_lines(monkeypatch, capsys, seconds: list[float], **kw) -> list[str]:
    """The lines a non-terminal Progress prints (one per step) when its steps take ``seconds``."""
    now = [0.0]
    monkeypatch.setattr(tracking, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    progress = tracking.Progress("epoch 1/3", 10, 0, enabled=True, line_every=0.0, **kw)
    for s in seconds:
        now[0] += s
        progress.step()
    return capsys.readouterr().err.splitlines()


def test_progress_estimates_the_runs_time_left_without_the_warm_up(monkeypatch, capsys):
    # The first step holds the warm-up (100 s); the rest take 1 s. The run has 30 steps left
    # from here (three epochs) and 3 validations of 2 s each.
    lines = _progress_lines(monkeypatch, capsys, [100.0] + [1.0] * 9, run_steps=30, fixed_seconds=6.0)
    assert len(lines) == 10
    assert all("estimating the time left" in line for line in lines[: tracking.WARMUP_STEPS])
    assert lines[-1] == "epoch 1/3: 10/10, 26 s left in the run"  # 20 steps at 1 s, then 6 s of validation
    assert _progress_lines(monkeypatch, capsys, [1.0] * 5, run_steps=4000)[-1].endswith(", 1 h 06 min left in the run")
