"""The command line: options generated from the config tree (one flag per field, its
real default in --help, each flag setting its field), how a config is built from
defaults, a file and flags, and bad input as one `error:` line with exit status 2.

Everything runs through ``vae_dist.cli.app.main`` in this process; real processes only
where the process is the point (the two entry points, a stdout that cannot be written).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import REPO, check_ok, cli_env, copy_run, main_in_process, one_error_line, small_train_args
from vae_dist.cli.app import build_config, main, parse_train_args
from vae_dist.models import REGISTRY
from vae_dist.config import RESUMABLE_FIELDS, TrainingConfig, options
from vae_dist.errors import ConfigError, OutputError, VaeDistError
from vae_dist.run.fileio import print_out

OPTIONS = list(options())
NEEDS_DEV_FULL = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


# --- options generated from the config tree ------------------------------------------------


def test_flags_are_unique_and_every_field_has_one():
    flags = [o.flag for o in OPTIONS]
    assert len(flags) == len(set(flags))

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    # Every leaf of a serialised config is an option, and nothing else is.
    assert {o.dotted for o in OPTIONS} == set(leaves(TrainingConfig().to_dict()))
    assert RESUMABLE_FIELDS < {o.dotted for o in OPTIONS}


def _help(capsys, monkeypatch, command: str = "train", columns: int = 400) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(columns))
    ran = main_in_process([command, "--help"], capsys)
    check_ok(ran)
    return ran.stdout.splitlines()


def _row(lines: list[str], flag: str) -> str:
    """The option's entry in --help: its line, and the deeper-indented lines its help wraps onto."""
    starts = [i for i, ln in enumerate(lines) if ln.startswith(f"  {flag} ") or ln == f"  {flag}"]
    assert len(starts) == 1, f"{flag} appears {len(starts)} times in --help"
    row = lines[starts[0]]
    for ln in lines[starts[0] + 1:]:
        if not ln.startswith("   "):
            break
        row += ("" if row.endswith("-") else " ") + ln.strip()  # the wrap breaks after a hyphen too
    return row


def test_help_lists_every_field_with_its_default_once(capsys, monkeypatch):
    lines = _help(capsys, monkeypatch)
    for flag in ("--config", "--resume", "--overwrite"):
        _row(lines, flag)
    for o in OPTIONS:
        row = _row(lines, o.flag)
        assert row.count("[default:") == 1, row
        if o.shown is not None:
            expected = f"({o.shown})"
        elif isinstance(o.default, bool):
            expected = o.flag[2:] if o.default else "no-" + o.flag[2:]
        elif isinstance(o.default, tuple):
            expected = ",".join(map(str, o.default))
        else:
            expected = str(o.default)
        assert f"[default: {expected}]" in row, row


def test_help_at_80_columns_shows_every_flag_whole(capsys, monkeypatch):
    # Any pipe is 80 columns: a table of columns cut the long names ("--limit-train-sa…").
    lines = _help(capsys, monkeypatch, columns=80)
    text = "\n".join(lines)
    for flag in ["--config", "--resume", "--overwrite", *(o.flag for o in OPTIONS)]:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} is not whole in --help"
    assert max(map(len, lines)) <= 80


@pytest.mark.parametrize(
    "command, flags",
    [
        ("train", ["--resume", "--overwrite", "--cpu", "--compile", "--fused-adam", "--help"]),
        ("evaluate", ["--json", "--help"]),
        ("sample", ["--manifold", "--help"]),
    ],
)
def test_boolean_flags_take_no_value_placeholder(command, flags, capsys, monkeypatch):
    lines = _help(capsys, monkeypatch, command)
    for flag in flags:
        _row(lines, flag)
    assert not [ln for ln in lines if "<bool>" in ln]
    if command == "train":
        assert "<int>" in _row(lines, "--batch-size")  # the negative control: values keep theirs


def _other_value(o) -> tuple[list[str], object]:
    """Command-line words that set ``o`` to a valid non-default value, and that value."""
    ann = o.annotation
    if typing.get_origin(ann) is typing.Union:
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if ann is bool:
        return ([f"--no-{o.flag[2:]}"] if o.default else [o.flag]), not o.default
    if typing.get_origin(ann) is typing.Literal:
        value = next(v for v in typing.get_args(ann) if v != o.default)
        return [o.flag, value], value
    if typing.get_origin(ann) is tuple:
        value = {"model.conv_channels": (8, 24), "model.hidden_sizes": (64, 32, 16), "model.vq_vae.channels": (8, 24),
                 "model.image_shape": (3, 32, 32), "report_to": ("wandb", "tensorboard")}.get(o.dotted, (0.5, 0.75))
        return [o.flag, ",".join(map(str, value))], value
    if ann is int:
        value = (o.default or 1) + 2
        return [o.flag, str(value)], value
    if ann is float:
        value = (o.default or 0.25) * 0.5
        return [o.flag, repr(value)], value
    return [o.flag, "/some/where"], "/some/where"


@pytest.mark.parametrize("o", OPTIONS, ids=[o.dotted for o in OPTIONS])
def test_every_flag_sets_its_field(o):
    words, value = _other_value(o)
    cfg = parse_train_args(words)
    *sections, leaf = o.dotted.split(".")
    assert getattr(functools.reduce(getattr, sections, cfg), leaf) == value
    # ... and only that field: everything else keeps its default.
    base, changed = TrainingConfig().to_dict(), json.loads(cfg.to_json())
    if o.dotted == "loss.iw_samples":
        base["loss"]["kl_warmup_epochs"] = changed["loss"]["kl_warmup_epochs"]  # no warm-up for the IW bound
    if o.dotted == "model.kind":
        for name in set().union(*(f.defaults for f in REGISTRY.values())):  # these follow the kind
            base["model"][name] = changed["model"][name]
    functools.reduce(dict.__getitem__, sections, changed)[leaf] = functools.reduce(dict.__getitem__, sections, base)[leaf]
    assert changed == base


def test_train_applies_the_process_settings_then_trains_the_config(monkeypatch, tmp_path):
    import vae_dist.training.trainer
    from vae_dist.training import runtime

    calls: list[tuple] = []
    monkeypatch.setattr(runtime, "prepare_process", lambda flush: calls.append(("prepare", flush)))
    monkeypatch.setattr(vae_dist.training.trainer, "train", lambda cfg, **kw: calls.append(("train", cfg, kw)))
    main(["train", "--artifact-dir", str(tmp_path / "run"), "--no-flush-denormal", "--overwrite"])
    (_, flush), (_, cfg, kw) = calls
    assert flush is False and cfg.flush_denormal is False and cfg.artifact_dir == str(tmp_path / "run")
    assert kw == {"resume": False, "overwrite": True}


# --- defaults <- config file <- flags -------------------------------------------------------


def test_a_saved_config_is_a_config_file_and_flags_override_it(tmp_path):
    saved = TrainingConfig.from_dict({"model": {"kind": "mlp", "latent_size": 12}, "epochs": 3, "data": {"batch_size": 32}})
    p = tmp_path / "config.json"
    p.write_text(saved.to_json())
    assert parse_train_args(["--config", str(p)]) == saved
    cfg = parse_train_args(["--config", str(p), "--seed", "5", "--epochs", "10"])
    assert (cfg.epochs, cfg.data.batch_size, cfg.seed, cfg.model) == (10, 32, 5, saved.model)
    # A flag left at its default is not given: the file's value stays. An explicit one,
    # even of the default value, wins.
    assert parse_train_args(["--config", str(p), "--batch-size", "64"]).data.batch_size == 64


@pytest.mark.parametrize("given", [{"latent_size": 12}, {"kind": "burda", "hidden_sizes": [300, 100]},
                                   {"activation": "tanh", "latent_size": 50}])
def test_model_by_flag_keeps_the_files_architecture_and_fills_only_what_it_leaves_unset(given, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model": given}))
    model = build_config(p, False, {"model.kind": "mlp"}).model
    mlp = REGISTRY["mlp"].defaults
    assert model.kind == "mlp"
    for name in ("latent_size", "hidden_sizes", "activation"):
        expected = given.get(name, mlp[name])
        assert getattr(model, name) == (tuple(expected) if isinstance(expected, list) else expected), name
    assert build_config(p, False, {"model.kind": "mlp", "model.latent_size": 7}).model.latent_size == 7


def test_resume_reads_the_runs_own_config(tmp_path):
    art = tmp_path / "run"
    art.mkdir()
    (art / "config.json").write_text(TrainingConfig.from_dict({"seed": 3, "artifact_dir": str(art)}).to_json())
    assert build_config(None, True, {"artifact_dir": str(art), "epochs": 20}).seed == 3
    assert build_config(None, False, {"artifact_dir": str(art)}).seed == 42


@pytest.mark.parametrize("section", [None, "conv", 3, []])
def test_a_section_that_is_not_an_object_is_one_line_even_with_flags(tmp_path, section):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": section}))
    for flags in ({"model.kind": "conv"}, {}):
        with pytest.raises(ConfigError, match="^model: must be a JSON object"):
            build_config(config, False, flags)


def test_a_family_section_that_is_not_an_object_is_one_line_with_its_flag(tmp_path):
    # The rule holds at every depth: a flag of model.vq_vae does not replace the file's null section.
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"kind": "vq-vae", "vq_vae": None}}))
    with pytest.raises(ConfigError, match=r"^model\.vq_vae: must be a JSON object, got None"):
        build_config(config, False, {"model.vq_vae.codebook_size": 64})


# --- bad input: one line, exit 2, nothing touched ---------------------------------------------

USER_ERRORS = {
    "unknown-flag": (["train", "--bogus"], ["--bogus"]),
    "unknown-command": (["frobnicate"], ["frobnicate"]),
    "model-foo": (["train", "--model", "foo"], ["--model", "foo"]),
    "epochs-not-int": (["train", "--epochs", "abc"], ["--epochs"]),
    "epochs-0": (["train", "--epochs", "0"], ["epochs"]),
    "learning-rate-negative": (["train", "--learning-rate", "-1"], ["learning_rate"]),
    "betas-bad-separator": (["train", "--betas", "0.9;0.99"], ["--betas", "separated by commas"]),
    "iw-with-kl-weight": (["train", "--iw-train-samples", "5", "--kl-weight", "0.5"], ["--kl-weight 1"]),
    "eps-flushed-to-zero": (["train", "--eps", "1e-40"], ["optimizer.eps", "float32"]),
    "seed-past-the-digit-limit": (["train", "--seed", "9" * 5000], ["--seed"]),
    "evaluate-no-argument": (["evaluate"], ["artifact_dir"]),
    "evaluate-iw-negative": (["evaluate", "somewhere", "--iw-samples", "-1"], ["--iw-samples"]),
    "evaluate-limit-0": (["evaluate", "somewhere", "--limit-eval-samples", "0"], ["--limit-eval-samples"]),
    # a control character in a path is shown escaped: the line stays one
    "newline-in-a-path": (["evaluate", "some\nwhere\x1b[2J"], ["no trained model at some\\nwhere\\x1b[2J"]),
}


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_user_error_is_one_line(name, capsys):
    argv, needles = USER_ERRORS[name]
    ran = main_in_process(argv, capsys)
    line = one_error_line(ran)
    assert ran.stderr.strip() == line and not ran.stdout
    for n in needles:
        assert n in line, (n, line)


def test_a_bad_value_in_the_config_file_is_named(tmp_path, capsys):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"data": {"batch_size": "64"}}))
    assert "data.batch_size" in one_error_line(main_in_process(["train", "--config", str(wrong)], capsys))


def test_a_missing_data_dir_is_one_line_and_creates_nothing(tmp_path, capsys):
    art = tmp_path / "run"
    line = one_error_line(main_in_process(small_train_args(tmp_path / "no-mnist-here", art), capsys))
    assert "no-mnist-here does not exist" in line
    assert not art.exists()


@pytest.mark.parametrize("flags, env, needle", [
    (["--mixed-precision", "fp16"], None, "--mixed-precision fp16 needs a GPU"),  # Accelerate would train in float32
    ([], "garbage", "ACCELERATE_MIXED_PRECISION=garbage: must be one of"),
], ids=["fp16-on-the-cpu", "unknown-in-the-environment"])
def test_a_precision_the_run_cannot_train_in_is_one_line_and_creates_nothing(
    flags, env, needle, data_dir, tmp_path, capsys, monkeypatch
):
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    art = tmp_path / "run"
    assert needle in one_error_line(main_in_process(small_train_args(data_dir, art, *flags), capsys))
    assert not art.exists()


@pytest.mark.slow  # trains four small runs
def test_each_run_in_one_process_trains_in_its_own_precision(data_dir, tmp_path, capsys):
    """Accelerate keeps a run's precision for the process: the run after a bf16 one trained in bf16 unasked (and said
    so in config.json), or was refused for asking for float32."""
    for i, (flags, used) in enumerate([(["--mixed-precision", "bf16"], "bf16"), ([], "no"),
                                       (["--mixed-precision", "bf16"], "bf16"), (["--mixed-precision", "no"], "no")]):
        art = tmp_path / str(i)
        tiny = ("--limit-train-samples", "64", "--limit-eval-samples", "32", "--batch-size", "32", "--max-steps", "1")
        check_ok(main_in_process(small_train_args(data_dir, art, *tiny, *flags), capsys))
        assert json.loads((art / "config.json").read_text())["mixed_precision"] == used


@pytest.mark.slow  # trains a small run
def test_the_data_folder_comes_from_the_environment_and_is_found_from_any_folder(
    data_dir, tmp_path, capsys, monkeypatch
):
    from vae_dist.data import datasets

    def no_download(*_):
        raise AssertionError("downloaded")

    monkeypatch.setattr(datasets, "download", no_download)
    (tmp_path / "mnist").symlink_to(data_dir.resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(datasets.DATA_DIR_ENV, "mnist")  # relative: config.json keeps it absolute
    args = [a for a in small_train_args(data_dir, tmp_path / "run") if a not in ("--data-dir", str(data_dir))]
    check_ok(main_in_process(args, capsys))
    monkeypatch.delenv(datasets.DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path / "elsewhere")
    check_ok(main_in_process(["evaluate", str(tmp_path / "run"), "--json"], capsys))
    (tmp_path / "mnist").unlink()
    assert f"{tmp_path / 'mnist'} does not exist" in one_error_line(
        main_in_process(["evaluate", str(tmp_path / "run")], capsys))


def test_evaluate_without_a_model_is_one_line(tmp_path, capsys):
    assert "no trained model" in one_error_line(main_in_process(["evaluate", str(tmp_path)], capsys))


# --- a path the file system refuses to look at: one line, not a traceback ------------------
# Python 3.11's pathlib answers is_dir()/is_file()/exists() with False only for a path that
# is not there: a name too long (ENAMETOOLONG) or a folder that may not be searched
# (EACCES) raises OSError. The tests run as root, which searches any folder, so EACCES is
# what a non-root user meets in a folder of mode 000, played by a patched Path.stat.

LONG = "x" * 300  # one path component longer than any file system's NAME_MAX (255)


def _deny_inside(monkeypatch, folder: Path) -> None:
    """Path.stat of anything inside ``folder`` (Path.lstat, is_file, is_dir, exists and
    is_symlink all go through it) fails with EACCES, as for a non-root user on mode 000."""
    import errno
    import os

    real = Path.stat

    def stat(self, *, follow_symlinks=True):
        if folder in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", stat)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _refused_in_one_line(argv, named: Path, cause: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """One `error:` line naming the path and the cause, and nothing under tmp_path touched.
    With cause EACCES, ``named`` (or, for a file, its folder) is the folder denied."""
    monkeypatch.chdir(tmp_path)  # a default path the command might fall back to lands here
    before = _tree(tmp_path)
    if cause == "Permission denied":
        _deny_inside(monkeypatch, named if named.is_dir() else named.parent)
    line = one_error_line(main_in_process(argv, capsys))
    monkeypatch.undo()
    assert str(named) in line and line.endswith(f": {cause}"), line
    assert _tree(tmp_path) == before


@pytest.mark.slow  # a real run folder and the real MNIST files
@pytest.mark.parametrize("case", ["resume-long-artifact-dir", "long-artifact-dir", "long-data-dir",
                                  "resume-denied-run", "denied-data-dir"])
def test_train_on_a_path_the_file_system_refuses_is_one_line_and_touches_nothing(
    case, data_dir, finished_run, tmp_path, capsys, monkeypatch
):
    run = copy_run(finished_run, tmp_path)
    if case == "resume-long-artifact-dir":
        argv, named, cause = small_train_args(data_dir, tmp_path / LONG, "--resume"), tmp_path / LONG, "File name too long"
    elif case == "long-artifact-dir":
        argv, named, cause = small_train_args(data_dir, tmp_path / LONG), tmp_path / LONG, "File name too long"
    elif case == "long-data-dir":
        argv, named, cause = small_train_args(tmp_path / LONG, tmp_path / "new"), tmp_path / LONG, "File name too long"
    elif case == "resume-denied-run":
        argv, named, cause = small_train_args(data_dir, run, "--resume"), run, "Permission denied"
    else:
        mnist = tmp_path / "mnist"
        shutil.copytree(data_dir, mnist)
        argv, named, cause = small_train_args(mnist, tmp_path / "new"), mnist, "Permission denied"
    _refused_in_one_line(argv, named, cause, tmp_path, capsys, monkeypatch)


@pytest.mark.slow  # a real run folder and the real MNIST files
@pytest.mark.parametrize("case", ["long-run", "long-data-dir", "denied-run", "denied-data-dir"])
def test_evaluate_on_a_path_the_file_system_refuses_is_one_line(
    case, data_dir, finished_run, tmp_path, capsys, monkeypatch
):
    run = copy_run(finished_run, tmp_path)
    if case == "long-run":
        argv, named, cause = ["evaluate", str(tmp_path / LONG)], tmp_path / LONG, "File name too long"
    elif case == "long-data-dir":
        argv, named, cause = ["evaluate", str(run), "--data-dir", str(tmp_path / LONG)], tmp_path / LONG, "File name too long"
    elif case == "denied-run":
        argv, named, cause = ["evaluate", str(run)], run, "Permission denied"
    else:
        mnist = tmp_path / "mnist"
        shutil.copytree(data_dir, mnist)
        argv, named, cause = ["evaluate", str(run), "--data-dir", str(mnist)], mnist, "Permission denied"
    _refused_in_one_line(argv, named, cause, tmp_path, capsys, monkeypatch)


@pytest.mark.slow  # a real run folder and the real MNIST files
@pytest.mark.parametrize("case", ["sample-long-run", "sample-long-out", "sample-denied-out-folder",
                                  "reconstruct-long-data-dir", "interpolate-denied-run"])
def test_a_picture_command_on_a_path_the_file_system_refuses_is_one_line_and_writes_nothing(
    case, finished_run, tmp_path, capsys, monkeypatch
):
    run = copy_run(finished_run, tmp_path)
    if case == "sample-long-run":
        argv, named, cause = ["sample", str(tmp_path / LONG)], tmp_path / LONG, "File name too long"
    elif case == "sample-long-out":
        argv, named, cause = ["sample", str(run), "--out", str(tmp_path / LONG)], tmp_path / LONG, "File name too long"
    elif case == "sample-denied-out-folder":
        pictures = tmp_path / "pictures"
        pictures.mkdir()
        argv, named, cause = ["sample", str(run), "--out", str(pictures / "s.png")], pictures / "s.png", "Permission denied"
    elif case == "reconstruct-long-data-dir":
        argv, named, cause = ["reconstruct", str(run), "--data-dir", str(tmp_path / LONG)], tmp_path / LONG, "File name too long"
    else:
        argv, named, cause = ["interpolate", str(run), "--from", "0", "--to", "1"], run, "Permission denied"
    _refused_in_one_line(argv, named, cause, tmp_path, capsys, monkeypatch)


def test_evaluate_with_an_unreadable_accelerate_variable_is_one_line(monkeypatch):
    import torch

    from vae_dist.evaluation.evaluate import score
    from vae_dist.models import build

    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "latent_size": 2}})
    monkeypatch.setenv("ACCELERATE_USE_CPU", "garbage")
    with pytest.raises(VaeDistError, match="^cannot set up the accelerator: "):
        score(build(cfg), cfg, torch.rand(4, 1, 28, 28))


@NEEDS_DEV_FULL
def test_a_result_that_stdout_cannot_take_is_an_error_and_a_status_line_is_dropped(monkeypatch):
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        with pytest.raises(OutputError, match="cannot write to standard output"):
            print_out("result")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        print_out("status", required=False)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_a_folder_vae_dist_did_not_create_is_left_untouched_even_with_overwrite(data_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "notes.txt").write_text("do not touch")
    (foreign / "config.json").write_text('{"not": "ours"}')  # a name vae_dist writes, but not its file
    (foreign / "checkpoints" / "weights.bin").write_bytes(bytes(range(256)))
    before = _snapshot(foreign)
    line = one_error_line(main_in_process(small_train_args(data_dir, foreign, "--overwrite"), capsys))
    assert "not created by vae_dist" in line
    assert _snapshot(foreign) == before


# --- the entry points, as real processes --------------------------------------------------


@pytest.mark.slow
def test_the_console_script_runs_and_a_usage_error_is_one_line():
    exe = shutil.which("vae-dist", path=cli_env().get("PATH"))
    assert exe is not None, "the vae-dist console script is not on PATH (pip install -e .)"
    ok = subprocess.run([exe, "--help"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    check_ok(ok)
    assert "train" in ok.stdout and "evaluate" in ok.stdout
    bad = subprocess.run([exe, "train", "--epochs", "0"], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                         timeout=60)
    assert "epochs" in one_error_line(bad)


TINY = ("--model", "mlp", "--hidden-sizes", "8", "--latent-size", "2", "--limit-train-samples", "64", "--batch-size", "32",
        "--limit-eval-samples", "100")


@pytest.mark.slow
@NEEDS_DEV_FULL
def test_a_full_stdout_costs_a_run_nothing(tmp_path, data_dir, capsys, monkeypatch):
    art = tmp_path / "run"
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        ran = main_in_process(small_train_args(data_dir, art, *TINY), capsys)
    check_ok(ran)  # the run's status lines are dropped, the run is not
    assert (art / "model.safetensors").is_file() and (art / "metrics.jsonl").is_file()


@pytest.mark.slow
@NEEDS_DEV_FULL
def test_a_result_a_full_stdout_cannot_take_is_one_line_and_nothing_at_exit(finished_run):
    """A real process: at exit Python flushes stdout once more, and a failure there would
    print a traceback and change the exit status."""
    with open("/dev/full", "w") as full:
        ran = subprocess.run([sys.executable, "-m", "vae_dist", "evaluate", str(finished_run), "--json"], cwd=REPO,
                             env=cli_env(), stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    ran.stdout = ""
    assert "cannot write to standard output" in one_error_line(ran)
    assert ran.stderr.strip().count("\n") == 0, ran.stderr


@pytest.mark.slow
@NEEDS_DEV_FULL
def test_a_stderr_that_cannot_be_written_costs_a_run_only_its_status_lines(tmp_path, data_dir, capsys, monkeypatch):
    """`2>/dev/full` (each write fails), in this process, and `2>&-` (no stream at all: a
    real process) used to end the run at step 1 with a traceback no one could read."""
    import os

    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stderr", full)
        ran = main_in_process(small_train_args(data_dir, tmp_path / "full", *TINY), capsys)
    assert ran.returncode == 0 and (tmp_path / "full" / "model.safetensors").is_file(), ran.stdout[-3000:]
    art = tmp_path / "closed"
    ran = subprocess.run([sys.executable, "-m", "vae_dist", *small_train_args(data_dir, art, *TINY)], cwd=REPO,
                         env=cli_env(), stdout=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert (art / "model.safetensors").is_file() and "model saved to" in ran.stdout


@pytest.mark.slow
def test_a_loss_curve_a_full_disk_refuses_is_one_line_and_the_run_succeeds(tmp_path, data_dir, capsys, monkeypatch):
    import errno

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", full_disk)
    art = tmp_path / "run"
    ran = main_in_process(small_train_args(data_dir, art, *TINY), capsys)
    check_ok(ran)
    assert "Traceback" not in ran.stderr
    assert f"loss curves {art / 'loss_curves.png'} not written (No space left on device); the model is saved" in ran.stdout
    assert (art / "model.safetensors").is_file() and not (art / "loss_curves.png").exists()
