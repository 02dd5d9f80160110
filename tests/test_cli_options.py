"""The train command's options are generated from the config tree: every field has one
flag, --help shows each field's real default once, and every flag sets its field."""

from __future__ import annotations

import json
import typing

import pytest

from vae_dist.cli import main, parse_train_args
from vae_dist.config import ARCHITECTURE_DEFAULTS, RESUMABLE_FIELDS, TrainingConfig, options

OPTIONS = list(options())


def _help(capsys, monkeypatch, command: str = "train") -> list[str]:
    monkeypatch.setenv("COLUMNS", "400")  # one row per option
    try:
        main([command, "--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    return capsys.readouterr().out.splitlines()


def _row(lines: list[str], flag: str) -> str:
    rows = [ln for ln in lines if ln.lstrip("│ ").startswith(flag + " ")]
    assert len(rows) == 1, f"{flag} appears {len(rows)} times in --help"
    return rows[0]


def test_flags_are_unique_and_every_field_has_one():
    flags = [o.flag for o in OPTIONS]
    assert len(flags) == len(set(flags))
    fields = {o.dotted for o in OPTIONS}
    # Every leaf of a serialised config is an option, and nothing else is.
    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    assert fields == set(leaves(TrainingConfig().to_dict()))
    assert RESUMABLE_FIELDS < fields


def test_help_lists_every_field_with_its_default_once(capsys, monkeypatch):
    lines = _help(capsys, monkeypatch)
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


@pytest.mark.parametrize(
    "command, flags",
    [
        ("train", ["--resume", "--overwrite", "--cpu", "--compile", "--fused-adam", "--help"]),
        ("evaluate", ["--json", "--help"]),
        ("sample", ["--manifold", "--help"]),
        ("reconstruct", ["--help"]),
        ("interpolate", ["--help"]),
    ],
)
def test_boolean_flags_take_no_value_placeholder(command, flags, capsys, monkeypatch):
    lines = _help(capsys, monkeypatch, command)
    for flag in flags:
        assert "<bool>" not in _row(lines, flag)
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
        value = {"model.conv_channels": (8, 24), "model.hidden_sizes": (64, 32, 16)}.get(o.dotted, (0.5, 0.75))
        return [o.flag, ",".join(map(str, value))], value
    if ann is int:
        value = (o.default or 1) + 2
        return [o.flag, str(value)], value
    if ann is float:
        value = (o.default or 0.25) * 0.5
        return [o.flag, repr(value)], value
    return [o.flag, "some/where"], "some/where"


@pytest.mark.parametrize("o", OPTIONS, ids=[o.dotted for o in OPTIONS])
def test_every_flag_sets_its_field(o):
    words, value = _other_value(o)
    cfg = parse_train_args(words)
    section, _, leaf = o.dotted.rpartition(".")
    got = getattr(getattr(cfg, section) if section else cfg, leaf)
    assert got == value
    # ... and only that field: everything else keeps its default.
    base, changed = TrainingConfig().to_dict(), json.loads(cfg.to_json())
    if o.dotted == "loss.iw_samples":
        base["loss"]["kl_warmup_epochs"] = changed["loss"]["kl_warmup_epochs"]  # no warm-up for the IW bound
    if o.dotted == "model.kind":
        for name in set().union(*ARCHITECTURE_DEFAULTS.values()):  # these follow the kind
            base["model"][name] = changed["model"][name]
    section_dict = changed[section] if section else changed
    section_dict[leaf] = (base[section] if section else base)[leaf]
    assert changed == base


def test_flags_left_at_their_default_do_not_override_the_config_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 3, "data": {"batch_size": 32}, "cpu": True}))
    cfg = parse_train_args(["--config", str(p), "--seed", "5"])
    assert (cfg.epochs, cfg.data.batch_size, cfg.cpu, cfg.seed) == (3, 32, True, 5)
    # An explicit flag does override it, including one that sets the default value.
    assert parse_train_args(["--config", str(p), "--batch-size", "64"]).data.batch_size == 64
    assert parse_train_args(["--config", str(p), "--no-cpu"]).cpu is False


def test_bad_pair_is_one_line(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["train", "--betas", "0.9;0.99"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --betas") and err.count("\n") == 1
