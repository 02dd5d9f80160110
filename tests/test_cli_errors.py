"""Bad input through the real CLI (a fresh `python -m vae_dist` process each time): exit
status 2, exactly one `error:` line on stderr, never a traceback, nothing of the user's
touched. Plus --help and the `vae-dist` console script.

Every process start costs seconds (torch is imported), so the scenarios are built once
and all the processes run a few at a time in a module fixture; each test then checks
its own scenario's result.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, cli_env, small_train_args

PARALLEL = 3


@dataclass
class Scenario:
    cmd: list[str]
    needles: list[str] = field(default_factory=list)
    result: subprocess.CompletedProcess | None = None


def _module(*args: str) -> list[str]:
    return [sys.executable, "-m", "vae_dist", *args]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


BAD_FLAGS = {
    "unknown-flag": (["train", "--bogus"], ["--bogus"]),
    "epochs-0": (["train", "--epochs", "0"], ["epochs"]),
    "batch-size-0": (["train", "--batch-size", "0"], ["batch_size"]),
    "learning-rate-negative": (["train", "--learning-rate", "-1"], ["learning_rate"]),
    "model-foo": (["train", "--model", "foo"], ["--model", "foo"]),
    "unknown-command": (["frobnicate"], ["frobnicate"]),
}

# More usage and config errors, checked in this process through the same `main()` (they
# are all refused before training starts), so they cost no process start each.
IN_PROCESS = {
    "epochs-not-int": (["train", "--epochs", "abc"], ["--epochs"]),
    "num-workers-negative": (["train", "--num-workers", "-1"], ["num_workers"]),
    "kl-weight-negative": (["train", "--kl-weight", "-0.5"], ["kl_weight"]),
    "limit-train-0": (["train", "--limit-train-samples", "0"], ["limit_train_samples"]),
    "keep-checkpoints-0": (["train", "--keep-checkpoints", "0"], ["keep_checkpoints"]),
    "recon-loss-bad": (["train", "--recon-loss", "l1"], ["--recon-loss"]),
    "wandb-mode-bad": (["train", "--wandb-mode", "sometimes"], ["--wandb-mode"]),
    "evaluate-no-argument": (["evaluate"], ["artifact_dir"]),
    "evaluate-iw-negative": (["evaluate", "somewhere", "--iw-samples", "-1"], ["--iw-samples"]),
    "evaluate-limit-0": (["evaluate", "somewhere", "--limit-eval-samples", "0"], ["--limit-eval-samples"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    """Build every scenario's files, run all the processes, return {name: Scenario} and
    the facts the checks need (the foreign folder's contents before the run)."""
    base = tmp_path_factory.mktemp("cli")
    sc: dict[str, Scenario] = {}
    facts: dict[str, object] = {}

    for name, (args, needles) in BAD_FLAGS.items():
        sc[name] = Scenario(_module(*args), needles)

    missing = base / "nope.json"
    sc["config-missing"] = Scenario(_module("train", "--config", str(missing)), [str(missing), "does not exist"])
    invalid = base / "invalid.json"
    invalid.write_text('{"epochs": 3,,}')
    sc["config-invalid-json"] = Scenario(_module("train", "--config", str(invalid)), [str(invalid), "not valid JSON"])
    unknown = base / "unknown.json"
    unknown.write_text(json.dumps({"epochs": 3, "optimizer": {"lr": 0.001}}))
    sc["config-unknown-key"] = Scenario(_module("train", "--config", str(unknown)), ["optimizer.lr"])

    no_data = base / "no-mnist-here"
    sc["data-dir-missing"] = Scenario(_module(*small_train_args(no_data, base / "art-missing")), [str(no_data)])

    broken = base / "mnist-truncated"
    broken.mkdir()
    for p in sorted(data_dir.iterdir()):
        if p.name.startswith(("train-labels", "t10k-")):
            (broken / p.name).symlink_to(p.resolve())
    src = data_dir / "train-images-idx3-ubyte.gz"
    with gzip.open(src, "rb") if src.exists() else open(data_dir / "train-images-idx3-ubyte", "rb") as f:
        head = f.read(200_000)  # a valid header, then far fewer bytes than 60000 images
    (broken / "train-images-idx3-ubyte").write_bytes(head)
    sc["data-dir-truncated"] = Scenario(
        _module(*small_train_args(broken, base / "art-truncated")), ["train-images-idx3-ubyte", "truncated"]
    )

    foreign = base / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("do not touch")
    (foreign / "config.json").write_text('{"not": "ours"}')  # a name vae_dist writes, but not its file
    (foreign / "checkpoints").mkdir()
    (foreign / "checkpoints" / "weights.bin").write_bytes(bytes(range(256)))
    facts["foreign"], facts["foreign_before"] = foreign, _snapshot(foreign)
    sc["artifact-dir-foreign"] = Scenario(
        _module(*small_train_args(data_dir, foreign, "--overwrite")), [str(foreign), "not created by vae_dist"]
    )

    empty = base / "no-model"
    empty.mkdir()
    sc["evaluate-no-model"] = Scenario(_module("evaluate", str(empty)), ["no trained model"])

    sc["help"] = Scenario(_module("--help"))
    exe = shutil.which("vae-dist", path=cli_env().get("PATH"))
    facts["script"] = exe
    if exe is not None:
        sc["script-help"] = Scenario([exe, "--help"])

    def run(s: Scenario) -> subprocess.CompletedProcess:
        return subprocess.run(s.cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        for s, result in zip(sc.values(), pool.map(run, sc.values())):
            s.result = result
    return sc, facts


def _assert_user_error(s: Scenario) -> str:
    proc = s.result
    assert proc is not None
    out = f"$ {' '.join(s.cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, out
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("error: "), out
    for n in s.needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


ERROR_SCENARIOS = [
    *BAD_FLAGS,
    "config-missing",
    "config-invalid-json",
    "config-unknown-key",
    "data-dir-missing",
    "data-dir-truncated",
    "artifact-dir-foreign",
    "evaluate-no-model",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ERROR_SCENARIOS)
def test_user_error(world, name):
    scenarios, _ = world
    _assert_user_error(scenarios[name])


@pytest.mark.slow
def test_foreign_artifact_dir_untouched(world):
    scenarios, facts = world
    _assert_user_error(scenarios["artifact-dir-foreign"])
    assert _snapshot(facts["foreign"]) == facts["foreign_before"]
    assert not (facts["foreign"] / ".vae_dist").exists()


@pytest.mark.slow
def test_module_help(world):
    proc = world[0]["help"].result
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "evaluate" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_console_script_on_path(world):
    scenarios, facts = world
    assert facts["script"] is not None, "the vae-dist console script is not on PATH (pip install -e .)"
    proc = scenarios["script-help"].result
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "evaluate" in proc.stdout


# --- in-process: the same main(), no process start ------------------------------------------


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from vae_dist.cli import main

    code = 0  # --help returns normally
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_user_error_in_process(name, capsys):
    argv, needles = IN_PROCESS[name]
    code, out, err = _main(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_config_file_value_named_in_process(tmp_path, capsys):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"data": {"batch_size": "64"}}))
    code, _, err = _main(["train", "--config", str(wrong), "--epochs", "1"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "data.batch_size" in err


def test_train_help_lists_flags(capsys):
    code, out, _ = _main(["train", "--help"], capsys)
    assert code in (0, None), out
    for flag in ("--config", "--artifact-dir", "--data-dir", "--epochs", "--batch-size", "--resume", "--overwrite"):
        assert flag in out, flag
