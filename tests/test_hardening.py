"""Issue 12, hardening: each test pins one way a run used to fail badly.

W&B failing at start, WANDB_MODE ignored, same-size corruption in a checkpoint, a stop
sent to the whole process group, --overwrite losing a run to a later check, symlinks
planted in the artifact folder, --compile, one-line errors, unbounded reads, silent
restarts, concurrent runs, errors stranded on the main process, shared random streams
and non-strict JSON. Subprocess tests run the real CLI or a real `accelerate launch`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, check_ok, cli_env, launch_cmd, one_error_line, output, run_cli, small_train_args
from vae_dist import artifacts
from vae_dist.artifacts import CHECKPOINTS, IMAGES, MARKER, METRICS, MODEL, prepare_artifact_dir
from vae_dist.checkpoint import TMP_PREFIX, read_manifest
from vae_dist.errors import ArtifactError, DataError, VaeDistError
from vae_dist.position import Position

# (Names added by the hardening are imported inside the tests that use them, so that this
# file also runs against the code before it, each test failing on its own.)
LOCK = ".vae_dist.lock"

# ----------------------------------------------------------------------- helpers

# A small mlp run: 20 optimizer steps per epoch on one process, seconds on 2 cores.
SMALL = ("--model", "mlp", "--batch-size", "32", "--limit-train-samples", "640", "--limit-eval-samples", "200")


def small(data_dir: Path, art: Path, *more: str) -> list[str]:
    return small_train_args(data_dir, art, *SMALL, *more)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (links not followed) with its bytes (None for folders and links)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    }


def weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(str(art / MODEL))


def assert_identical_weights(art: Path, ref: Path) -> None:
    wa, wr = weights(art), weights(ref)
    assert wa.keys() == wr.keys()
    different = [k for k in wr if not torch.equal(wa[k], wr[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"


def resumed_from(proc: subprocess.CompletedProcess) -> str:
    found = re.findall(r"resumed from (\S+):", output(proc))
    assert len(found) == 1, output(proc)[-3000:]
    return found[0]


class Streamed:
    """A subprocess whose merged output is read as it comes, to act on a line. It runs in
    its own session (process group); whatever is left of it is killed after the test."""

    started: list["Streamed"] = []

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        Streamed.started.append(self)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines).replace("\r", "\n")

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text):
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"ended (exit {self.proc.returncode}) before {pattern!r}:\n{self.text[-3000:]}")
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.text[-3000:]}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s later:\n{self.text[-3000:]}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: loader workers and ranks too
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    while Streamed.started:
        Streamed.started.pop().kill()


# ----------------------------------------------------------------------- 3. corrupt bytes


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    art = tmp_path_factory.mktemp("ref") / "run"
    check_ok(run_cli(small(data_dir, art, "--checkpoint-every-steps", "5")))
    return art


# ----------------------------------------------------------------------- 4. SIGTERM to the group


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    args = small_train_args(
        data_dir, art, "--model", "mlp", "--num-workers", "2", "--limit-train-samples", "3200", "--epochs", "20",
        "--checkpoint-every-steps", "3", "--limit-eval-samples", "200",
    )
    run = Streamed([sys.executable, "-m", "vae_dist", *args], cli_env())
    run.wait_for(r"checkpoint \S+step-000000003 written")
    os.killpg(run.proc.pid, signal.SIGTERM)  # the shell's `kill -TERM -<pgid>`: workers too
    rc = run.wait(60)
    assert rc == 128 + signal.SIGTERM, run.text[-3000:]
    assert "stopped by SIGTERM" in run.text and "Traceback" not in run.text, run.text[-3000:]
    done = [p for p in (art / CHECKPOINTS).iterdir() if read_manifest(p, Position) is not None]
    assert max(read_manifest(p, Position).global_step for p in done) > 3  # the stop's own checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "launcher"])
def test_sigterm_under_accelerate_launch_with_workers_checkpoints(target: str, data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    args = small_train_args(
        data_dir, art, "--model", "mlp", "--num-workers", "2", "--limit-train-samples", "3200", "--epochs", "20",
        "--checkpoint-every-steps", "3", "--limit-eval-samples", "200",
    )
    run = Streamed(launch_cmd(2, args), cli_env())
    run.wait_for(r"checkpoint \S+step-000000003 written")
    if target == "group":
        os.killpg(run.proc.pid, signal.SIGTERM)
    else:
        run.proc.send_signal(signal.SIGTERM)  # torchrun's agent forwards it to the ranks
    rc = run.wait(90)
    assert rc != 0
    assert re.search(r"stopped by SIGTERM; checkpoint \S+ is complete", run.text), run.text[-4000:]
    assert "DataLoader worker" not in run.text, run.text[-4000:]
    done = [p for p in (art / CHECKPOINTS).iterdir() if read_manifest(p, Position) is not None]
    assert max(read_manifest(p, Position).global_step for p in done) > 3
    assert not [p for p in (art / CHECKPOINTS).iterdir() if p.name.startswith(TMP_PREFIX)]


def test_loader_workers_ignore_stop_signals() -> None:
    from vae_dist.data import MnistImages, make_loader

    loader = make_loader(
        MnistImages(torch.zeros(8, 1, 28, 28, dtype=torch.uint8)), 4, shuffle_seed=None, drop_last=False,
        num_workers=1,
    )
    init = loader.worker_init_fn
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        init(3)  # as a worker would, in this process
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------- 5. checks before --overwrite


@pytest.mark.slow
def test_overwrite_with_a_value_that_fails_keeps_the_previous_run(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    check_ok(run_cli(small(data_dir, art)))
    before = snapshot(art)
    proc = run_cli([*small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "100",
                                      "--batch-size", "128"), "--overwrite"])
    line = one_error_line(proc)
    assert "smaller than one global batch" in line
    assert snapshot(art) == before


def test_absurd_model_refused_before_anything_is_built() -> None:
    from vae_dist.config import ModelConfig
    from vae_dist.model import VAE, parameter_count

    for cfg in (ModelConfig(), ModelConfig(kind="mlp", latent_size=3, hidden_sizes=(17,)),
                ModelConfig(kind="conv", latent_size=5, conv_channels=(3, 7))):
        assert parameter_count(cfg) == sum(p.numel() for p in VAE(cfg).parameters())


# ----------------------------------------------------------------------- 6. planted symlinks


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return out


def _previous_run(root: Path) -> None:
    prepare_artifact_dir(root, overwrite=False, resume=False)
    (root / "config.json").write_text("{}")
    (root / CHECKPOINTS).mkdir()


# (entry, is the link to a folder, the flags): every path vae_dist writes or deletes.
LINKS = [
    ("config.json", False, "overwrite"),
    (METRICS, False, "resume"),
    (MODEL, False, "overwrite"),
    (MARKER, False, "resume"),
    (LOCK, False, "overwrite"),
    (IMAGES, True, "resume"),
    (CHECKPOINTS, True, "resume"),
    ("checkpoints/.tmp-step-000000005", True, "resume"),
    ("checkpoints/step-000000005", True, "overwrite"),
    ("images/epoch-001-samples.png", False, "resume"),
]


@pytest.mark.parametrize(("entry", "folder", "flags"), LINKS, ids=[e for e, _, _ in LINKS])
def test_symlink_where_vae_dist_writes_is_refused(entry: str, folder: bool, flags: str, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "run"
    _previous_run(root)
    link = root / entry
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside if folder else outside / "precious.txt")
    before_outside, before_root = snapshot(outside), snapshot(root)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=flags == "overwrite", resume=flags == "resume")
    assert "symbolic link" in one_line(e)
    assert snapshot(outside) == before_outside
    assert snapshot(root) == before_root


def test_artifact_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    link = tmp_path / "run"
    link.symlink_to(outside, target_is_directory=True)
    (outside / "precious.txt").unlink()  # an empty folder, which today would be taken over
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(link, overwrite=False, resume=False)
    assert "symbolic link" in one_line(e)
    assert list(outside.iterdir()) == []


def test_write_probe_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "run"
    _previous_run(root)
    (root / ".write-test").symlink_to(outside / "precious.txt")
    prepare_artifact_dir(root, overwrite=True, resume=False)
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (root / ".write-test").is_symlink()  # not ours: neither followed nor deleted


@pytest.mark.slow
def test_cli_refuses_a_planted_checkpoints_link(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    check_ok(run_cli(small(data_dir, art)))
    outside = _outside(tmp_path)
    shutil.rmtree(art / CHECKPOINTS)
    (art / CHECKPOINTS).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    line = one_error_line(run_cli([*small(data_dir, art, "--epochs", "2"), "--resume"]))
    assert "symbolic link" in line
    assert snapshot(outside) == before


# ----------------------------------------------------------------------- 7. --compile


@pytest.mark.slow
def test_compiled_model_is_usable_by_its_own_commands(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    proc = run_cli(small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "256",
                                    "--limit-eval-samples", "100", "--compile"), timeout=600)
    check_ok(proc)
    assert not [k for k in weights(art) if "_orig_mod" in k]
    check_ok(run_cli(["evaluate", str(art), "--data-dir", str(data_dir), "--limit-eval-samples", "100"]))
    check_ok(run_cli(["sample", str(art), "--num", "4"]))


def test_model_files_with_compile_prefixes_still_load(tmp_path: Path) -> None:
    """Files written by earlier versions with --compile carry `_orig_mod.` names."""
    from safetensors.torch import save_file

    from vae_dist.config import TrainingConfig
    from vae_dist.model import VAE

    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "latent_size": 2, "hidden_sizes": [8]}})
    state = {f"_orig_mod.{k}": v for k, v in VAE(cfg.model).state_dict().items()}
    save_file(state, str(tmp_path / MODEL), metadata={"format": "pt", "vae_dist_config": cfg.to_json()})
    model, _ = artifacts.load_model_file(tmp_path)
    assert torch.equal(model.state_dict()["decoder.net.0.weight"], state["_orig_mod.decoder.net.0.weight"])


# ----------------------------------------------------------------------- 8. one-line errors


def test_model_file_claiming_a_huge_model_is_refused_before_allocating(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vae_dist.config import TrainingConfig

    cfg = TrainingConfig().to_dict()
    cfg["model"].update(kind="conv", latent_size=10**9)
    save_file({"x": torch.zeros(1)}, str(tmp_path / MODEL), metadata={"format": "pt", "vae_dist_config": json.dumps(cfg)})
    t0 = time.monotonic()
    with pytest.raises(VaeDistError) as e:
        artifacts.load_model_file(tmp_path)
    assert time.monotonic() - t0 < 5
    one_line(e)


def test_model_size_is_bounded_from_the_config_alone() -> None:
    """Whatever the config's own ranges allow, a model over the bound is refused from its
    sizes, before a byte is allocated (built unvalidated, as a future range could allow)."""
    from vae_dist.config import ModelConfig, TrainingConfig

    huge = ModelConfig(kind="mlp").model_copy(update={"latent_size": 10**6, "hidden_sizes": (10**6,)})
    config = TrainingConfig().model_copy(update={"model": huge})
    t0 = time.monotonic()
    with pytest.raises(VaeDistError) as e:
        artifacts.check_model_size(config, "config")
    assert time.monotonic() - t0 < 1
    assert "parameters" in one_line(e)
    artifacts.check_model_size(TrainingConfig(), "config")  # the default is fine


@pytest.mark.slow
@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**63)])
def test_out_of_range_seed_for_pictures_is_one_line(seed: str, uninterrupted: Path) -> None:
    line = one_error_line(run_cli(["sample", str(uninterrupted), "--num", "4", "--seed", seed, "--out",
                                   str(uninterrupted.parent / "s.png")]))
    assert "--seed" in line


# ----------------------------------------------------------------------- 10. silent restarts


@pytest.mark.slow
def test_second_training_in_the_same_folder_is_refused(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    # Long enough to still be training when the second run starts; stopped by SIGTERM after.
    args = small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "3200", "--epochs", "1000",
                            "--checkpoint-every-steps", "3", "--limit-eval-samples", "200")
    first = Streamed([sys.executable, "-m", "vae_dist", *args], cli_env())
    first.wait_for(r"checkpoint \S+ written")
    second = run_cli([*args, "--overwrite"])
    line = one_error_line(second)
    assert f"in use by another vae_dist run (pid {first.proc.pid})" in line
    assert first.proc.poll() is None, "the first run ended before the second was refused"
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(60) == 128 + signal.SIGTERM, first.text[-3000:]
    # The first run's outputs were not cleared under it: its stop checkpoint is complete.
    assert re.search(r"stopped by SIGTERM; checkpoint \S+ is complete", first.text), first.text[-3000:]
    assert [p for p in (art / CHECKPOINTS).iterdir() if read_manifest(p, Position) is not None]
    assert (art / METRICS).is_file()


def test_lock_is_released_when_the_holder_ends(tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = artifacts.RunLock()
    prepare_artifact_dir(root, overwrite=False, resume=False, lock=holder)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=False, resume=False, lock=artifacts.RunLock())
    assert f"(pid {os.getpid()})" in one_line(e)
    holder.release()
    with artifacts.RunLock() as again:
        prepare_artifact_dir(root, overwrite=False, resume=False, lock=again)


# ----------------------------------------------------------------------- 11. processes and streams

MAIN_FAILS = textwrap.dedent(
    """
    import os, sys, time
    from accelerate import Accelerator
    from vae_dist.distributed import on_main_then_share

    acc = Accelerator(cpu=True)
    report = sys.argv[1]

    def fail():
        raise OSError(28, "No space left on device")

    t0 = time.monotonic()
    try:
        on_main_then_share(acc, fail)
        got = "no error"
    except BaseException as e:
        got = f"{type(e).__name__}: {e}"
    if acc.process_index == 1:
        with open(report + ".tmp", "w") as f:
            f.write(f"{time.monotonic() - t0:.2f} {got}")
        os.replace(report + ".tmp", report)
    else:
        print("rank 0:", got, flush=True)
        # No collective here: rank 1 may still be inside one. Wait for its report.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not os.path.exists(report):
            time.sleep(0.1)
    os._exit(0)
    """
)


@pytest.mark.slow
def test_any_main_process_error_reaches_the_other_ranks(tmp_path: Path) -> None:
    script = tmp_path / "main_fails.py"
    script.write_text(MAIN_FAILS)
    report = tmp_path / "rank1.txt"
    cmd = launch_cmd(2, [])[:-2] + [str(script), str(report)]  # the script instead of `-m vae_dist`
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert "rank 0: OSError" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report.exists(), proc.stderr[-3000:]
    seconds, got = report.read_text().split(" ", 1)
    assert "OSError" in got and "No space left on device" in got, got
    assert float(seconds) < 15


def test_main_process_error_keeps_its_type_on_the_main_process() -> None:
    from accelerate import Accelerator

    from vae_dist.distributed import on_main_then_share

    acc = Accelerator(cpu=True)

    def fail():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        on_main_then_share(acc, fail)


def test_json_result_is_strict_json() -> None:
    from vae_dist.evaluate import json_result

    text = json_result({"loss": float("nan"), "iw_nll": float("inf"), "kl": -float("inf"), "recon": 1.5, "samples": 3})

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed == {"loss": None, "iw_nll": None, "kl": None, "recon": 1.5, "samples": 3}
    assert "\n" not in text
    assert not math.isnan(parsed["recon"])
