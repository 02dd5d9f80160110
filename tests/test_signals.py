"""Stopping a run: SIGTERM or SIGINT asks for a stop after the current step; the run then
checkpoints and exits 128 + the signal, saying how to resume. A second Ctrl-C stops at once.

In this process: the stop request itself, the loader workers' init, and signals raised at a
chosen step from inside the batch stream (where the fault hook sits). Real processes only
where the process tree is the point: a stop sent to a process group that holds loader
workers (a worker killed by it used to end the run in a DataLoader error), for one process
and for `accelerate launch` with two ranks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, check_ok, cli_env, launch_cmd, main_in_process, output, small_train_args
from test_learner import _learner, _untimed, _weights
from vae_dist import faults
from vae_dist.signals import Preempted, StopRequest

STOPS = (signal.SIGTERM, signal.SIGINT)


@pytest.fixture
def stray_signals():
    """SIGTERM/SIGINT that reach this process outside a StopRequest are recorded here
    instead of ending the test session."""
    seen: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in STOPS}
    yield seen
    for s, h in before.items():
        signal.signal(s, h)


def signal_during_step(monkeypatch: pytest.MonkeyPatch, step: int, *signums: int) -> None:
    """The batch stream sends ``signums`` to this process just before the batch of global
    step ``step`` (1-based, as checkpoint folders count)."""

    def inject(batches, rank, first_step):
        for n, batch in enumerate(batches, start=first_step + 1):
            if n == step:
                for s in signums:
                    os.kill(os.getpid(), s)
            yield batch

    monkeypatch.setattr(faults, "active", lambda: True)
    monkeypatch.setattr(faults, "inject", inject)


# ------------------------------------------------------------------ in this process


def test_stop_request_semantics(stray_signals) -> None:
    """The first SIGTERM/SIGINT only asks; a second SIGINT raises at once; the previous
    handlers come back afterwards."""
    before = [signal.getsignal(s) for s in STOPS]
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.requested and stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the handler raises on return from os.kill
    assert [signal.getsignal(s) for s in STOPS] == before
    assert stray_signals == []


def test_loader_workers_ignore_stop_signals(stray_signals) -> None:
    from vae_dist.data import MnistImages, make_loader

    loader = make_loader(MnistImages(torch.zeros(8, 1, 28, 28, dtype=torch.uint8)), 4, shuffle_seed=None,
                         drop_last=False, num_workers=1)
    loader.worker_init_fn(0)  # as a worker would, in this process (the fixture restores the handlers)
    assert [signal.getsignal(s) for s in STOPS] == [signal.SIG_IGN, signal.SIG_IGN]


def test_a_stop_checkpoints_its_step_and_resumes_to_the_same_weights(tmp_path, monkeypatch, stray_signals) -> None:
    whole = _learner(tmp_path / "whole", epochs=2)
    whole.fit()
    signal_during_step(monkeypatch, 14, signal.SIGTERM)  # mid-epoch: 10 steps per epoch
    with pytest.raises(Preempted) as stopped:
        _learner(tmp_path / "split", epochs=2).fit()
    assert stopped.value.signum == signal.SIGTERM
    assert Path(stopped.value.checkpoint).name == "step-000000014"  # the step under way is finished
    monkeypatch.undo()
    resumed = _learner(tmp_path / "split", epochs=2, resume=True)
    resumed.fit()
    assert torch.equal(_weights(resumed.model), _weights(whole.model))
    assert _untimed(resumed.position.history) == _untimed(whole.position.history)
    assert stray_signals == []


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(data_dir, tmp_path, monkeypatch, capsys, stray_signals) -> None:
    """The whole path of an impatient user: handler, train loop, CLI; no checkpoint is
    written for the interrupted step, and the exit is 130 with one line."""
    art = tmp_path / "run"
    signal_during_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    ran = main_in_process(small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "640",
                                           "--limit-eval-samples", "100", "--checkpoint-every-steps", "1"), capsys)
    assert ran.returncode == 130, output(ran)[-3000:]
    assert ran.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in ran.stderr
    assert sorted(p.name for p in (art / "checkpoints").iterdir()) == ["step-000000001", "step-000000002"]
    assert stray_signals == []


# ------------------------------------------------------------------ real process groups


class Streamed:
    """A process tree in its own session, its merged output read as it comes."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines).replace("\r", "\n")

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} (exit {self.proc.poll()}):\n{self.text[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s after the signal:\n{self.text[-3000:]}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left: ranks and loader workers too
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def streamed():
    started: list[Streamed] = []
    yield lambda cmd: started.append(Streamed(cmd)) or started[-1]
    for s in started:
        s.kill()


def long_run(data_dir: Path, art: Path) -> list[str]:
    """A run with two loader workers, far longer than the test waits (20 epochs), that
    checkpoints every 3 steps: the signal comes after the first checkpoint."""
    return small_train_args(data_dir, art, "--model", "mlp", "--num-workers", "2", "--limit-train-samples", "3200",
                            "--epochs", "20", "--checkpoint-every-steps", "3", "--limit-eval-samples", "200")


def stopped_at(text: str) -> Path:
    """The checkpoint the run said it stopped at."""
    found = re.findall(r"stopped by SIGTERM; checkpoint (\S+) is complete\. Continue with the same command plus --resume",
                       text)
    assert len(found) == 1, text[-4000:]  # one announcement, from the main process
    assert "DataLoader worker" not in text, text[-4000:]
    return Path(found[0])


@pytest.mark.slow
def test_sigterm_to_the_group_of_a_process_with_loader_workers(data_dir, tmp_path, capsys, streamed) -> None:
    art = tmp_path / "run"
    args = long_run(data_dir, art)
    run = streamed([sys.executable, "-m", "vae_dist", *args])
    run.wait_for(r"checkpoint \S+step-000000003 written")
    os.killpg(run.proc.pid, signal.SIGTERM)  # the shell's `kill -TERM -<pgid>`: the workers get it too
    assert run.wait(60) == 128 + signal.SIGTERM, run.text[-3000:]
    assert "Traceback" not in run.text, run.text[-3000:]
    stop = stopped_at(run.text)
    step = int(stop.name.split("-")[1])
    assert step > 3  # the stop's own checkpoint
    resumed = main_in_process([*args, "--resume", "--max-steps", str(step + 2)], capsys)
    check_ok(resumed)
    assert f"resumed from {stop.name}:" in output(resumed)
    assert (art / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_to_the_launchers_group_stops_both_ranks_at_one_checkpoint(data_dir, tmp_path, streamed) -> None:
    art = tmp_path / "run"
    run = streamed(launch_cmd(2, long_run(data_dir, art)))
    run.wait_for(r"checkpoint \S+step-000000003 written")
    os.killpg(run.proc.pid, signal.SIGTERM)  # launcher, both ranks and their four workers
    assert run.wait(90) != 0  # torchrun's agent reports the signal with a traceback of its own
    stop = stopped_at(run.text)
    assert int(stop.name.split("-")[1]) > 3
    assert sorted(p.name for p in stop.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert (stop / "MANIFEST.json").is_file()
    assert not [p for p in (art / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
