"""Stopping a run: SIGTERM, SIGINT or SIGHUP asks for a stop after the current step; the run
then checkpoints and exits 128 + the signal, saying how to resume. A second Ctrl-C stops at
once. A stop that comes after the last step lets the export finish and says so.

In this process: the stop request itself, the loader workers' init, and signals raised at a
chosen step from inside the batch stream (where the fault hook sits). Real processes only
where the process tree is the point: a stop sent to a process group that holds loader
workers (a worker killed by it used to end the run in a DataLoader error), and a stop that
reaches one rank of two under `accelerate launch`.
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
from vae_dist.training import faults
from vae_dist.training.distributed import Preempted, StopRequest

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@pytest.fixture
def stray_signals():
    """SIGTERM/SIGINT/SIGHUP that reach this process outside a StopRequest are recorded here
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
    """The first SIGTERM/SIGINT/SIGHUP only asks; a second SIGINT raises at once; the
    previous handlers come back afterwards."""
    before = [signal.getsignal(s) for s in STOPS]
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.signum == signal.SIGTERM
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGHUP)  # a closed terminal: a stop request, not the end
        assert stop.signum == signal.SIGHUP
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the handler raises on return from os.kill
    assert [signal.getsignal(s) for s in STOPS] == before
    assert stray_signals == []


def test_loader_workers_ignore_stop_signals(stray_signals) -> None:
    from vae_dist.data.loaders import MnistImages, make_loader

    loader = make_loader(MnistImages(torch.zeros(8, 1, 28, 28, dtype=torch.uint8)), 4, shuffle_seed=None,
                         drop_last=False, num_workers=1)
    loader.worker_init_fn(0)  # as a worker would, in this process (the fixture restores the handlers)
    assert [signal.getsignal(s) for s in STOPS] == [signal.SIG_IGN] * 3


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


def test_sighup_checkpoints_its_step_like_sigterm(tmp_path, monkeypatch, stray_signals) -> None:
    signal_during_step(monkeypatch, 4, signal.SIGHUP)
    with pytest.raises(Preempted) as stopped:
        _learner(tmp_path / "run").fit()
    assert stopped.value.signum == signal.SIGHUP  # the CLI exits 128 + 1
    assert Path(stopped.value.checkpoint).name == "step-000000004"
    assert str(stopped.value) == (f"stopped by SIGHUP; checkpoint {stopped.value.checkpoint} is complete. "
                                  "Continue with the same command plus --resume.")
    assert stray_signals == []


def test_the_stop_line_never_fails_on_its_signal_number() -> None:
    """A rank that only learned of a stop from the others once carried signal 0, and
    naming it raised ValueError instead of printing the line."""
    assert str(Preempted(0, "ckpt")).startswith("stopped by signal 0; checkpoint ckpt is complete.")


def test_a_stop_after_the_last_step_is_kept_for_the_caller(tmp_path, stray_signals) -> None:
    """A signal during the final validation (after the last step's stop check) is neither
    lost nor fatal: fit returns, and the caller's StopRequest still holds it."""
    learner = _learner(tmp_path / "run", epochs=1)
    learner.on_epoch_end = lambda *a: os.kill(os.getpid(), signal.SIGTERM)
    with StopRequest() as stop:
        learner.fit(stop)
        assert stop.signum == signal.SIGTERM
    assert learner.position.global_step == 10
    assert stray_signals == []


@pytest.mark.parametrize("signum", STOPS)
def test_a_stop_before_the_first_step_ends_the_run_at_once_with_one_line(tmp_path, monkeypatch, capsys, signum,
                                                                         stray_signals) -> None:
    """While the data loads there is nothing to checkpoint: the run ends there with the
    stop's line and 128 + the signal (it used to die of SIGTERM/SIGHUP without a word, or
    print "interrupted" for SIGINT), as an exception out of train(), before the artifact
    folder exists."""
    from vae_dist.training import trainer as training

    def loading(accelerator, config):
        os.kill(os.getpid(), signum)
        raise AssertionError("the set-up went on after the signal")

    monkeypatch.setattr(training, "load_images", loading)
    art = tmp_path / "run"
    ran = main_in_process(small_train_args(tmp_path / "mnist", art), capsys)
    assert ran.returncode == 128 + signum, ran.stderr[-3000:]
    assert ran.stderr.strip() == f"stopped by {signal.Signals(signum).name} before the first training step; " \
        "nothing was trained: run the same command again to start."
    assert not art.exists() and stray_signals == []


def test_the_main_processs_stop_reaches_the_other_ranks_as_the_same_stop() -> None:
    """A stop the main process got inside work it does for all (on_main_then_share) ends
    the other ranks with the same exit status and no "error:" line of their own."""
    import pickle

    from vae_dist.training.distributed import as_seen_by_the_others

    seen = pickle.loads(pickle.dumps(as_seen_by_the_others(Preempted(signal.SIGTERM))))  # as broadcast
    assert type(seen) is Preempted and seen.signum == signal.SIGTERM and "before the first training step" in str(seen)
    ran = pickle.loads(pickle.dumps(as_seen_by_the_others(Preempted(signal.SIGINT, "ckpt", finished=True))))
    assert (ran.signum, ran.checkpoint, ran.finished) == (signal.SIGINT, "ckpt", True)


@pytest.mark.slow
def test_sigterm_during_the_export_finishes_it_and_ends_with_one_line(data_dir, tmp_path, monkeypatch, capsys,
                                                                      stray_signals) -> None:
    """The whole path: SIGTERM while the loss curves are written (after model.safetensors):
    the export finishes, then one line and 143 (it used to die at once, with no line)."""
    from vae_dist.evaluation import images

    save = images.save_loss_curves

    def save_under_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return save(*args, **kwargs)

    monkeypatch.setattr(images, "save_loss_curves", save_under_sigterm)
    art = tmp_path / "run"
    ran = main_in_process(small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "320",
                                           "--limit-eval-samples", "100"), capsys)
    assert ran.returncode == 128 + signal.SIGTERM, output(ran)[-3000:]
    assert ran.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after training finished; {art / 'model.safetensors'} is complete, nothing to resume.")
    assert "Traceback" not in output(ran)
    assert (art / "model.safetensors").is_file() and (art / "loss_curves.png").is_file()
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
def test_sigterm_to_one_rank_stops_both_for_it_with_one_line(data_dir, tmp_path) -> None:
    """Rank 1 alone gets SIGTERM (before step 3): both ranks stop at the next agreement
    (step 10) for SIGTERM, rank 0 names it, and both exit 143. Rank 0 used to raise
    ValueError for signal 0 and print no line."""
    art = tmp_path / "run"
    args = small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "1920",  # 15 steps
                            "--limit-eval-samples", "100")
    ran = subprocess.run(launch_cmd(2, args), cwd=REPO, env=cli_env(VAE_DIST_TEST_FAIL_AT="1:2:term"),
                         capture_output=True, text=True, timeout=120)
    text = output(ran)
    assert ran.returncode != 0 and "Error: 0 is not" not in text and "ValueError" not in text, text[-4000:]
    stop = stopped_at(text)
    assert stop.name == "step-000000010"
    assert sorted(p.name for p in stop.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    # torchrun's report of each rank: 143, or -15 for a rank still exiting when the agent,
    # seeing the other rank's 143, sent it SIGTERM itself (after its line).
    codes = re.findall(r"exitcode\s*: (-?\d+)", text)
    assert "143" in codes and set(codes) <= {"143", "-15"}, text[-4000:]
    assert not (art / "model.safetensors").exists()
