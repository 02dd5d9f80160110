"""--report-to tensorboard: the event files TensorBoard reads hold what metrics.jsonl holds,
at the same steps, with the epoch's pictures and the config; a resumed run continues them
without showing any step twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import check_ok, main_in_process, one_error_line, small_train_args
from vae_dist.training import tracking
from vae_dist.run.folder import CHECKPOINTS, MODEL, TENSORBOARD, read_metrics

LOG_EVERY = 4
STEPS_PER_EPOCH = 1024 // 64
# What an epoch's row logs (train/step_loss aside); the rest of a row is bookkeeping.
NOT_LOGGED = ("epoch", "step", "complete_epoch", "protocol")


def test_a_missing_tensorboard_is_one_line_naming_the_extra_before_the_folder(tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    art = tmp_path / "run"
    ran = main_in_process(small_train_args(tmp_path / "no-data", art, "--report-to", "tensorboard"), capsys)
    assert "[tensorboard]" in one_error_line(ran)
    assert not art.exists()


def _event_files(folder: Path) -> list[list]:
    """Each event file's events, the files in the order they were written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = [list(EventFileLoader(str(p)).Load()) for p in folder.iterdir()]
    return sorted(files, key=lambda events: events[0].wall_time)


@pytest.mark.slow
def test_event_files_match_metrics_and_a_resumed_run_repeats_no_step(data_dir: Path, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    art = tmp_path / "run"
    args = small_train_args(data_dir, art, "--model", "mlp", "--epochs", "2", "--report-to", "tensorboard",
                            "--log-every-steps", str(LOG_EVERY))
    check_ok(main_in_process(args, capsys))
    # As if killed after logging its second epoch but before sealing its checkpoint: the
    # resumed run redoes steps 17-32, which the first run's files already hold.
    last = sorted((art / CHECKPOINTS).iterdir())[-1]
    assert last.name.endswith(f"{2 * STEPS_PER_EPOCH:09d}")
    for p in sorted(last.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    last.rmdir()
    (art / MODEL).unlink()
    check_ok(main_in_process([*args, "--resume"], capsys))

    first, resumed = _event_files(art / TENSORBOARD)
    starts = [e.step for e in resumed if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [STEPS_PER_EPOCH + 1], "the resumed run hides what the first logged after its checkpoint"
    assert {e.step for e in first if e.summary.value} >= {STEPS_PER_EPOCH + LOG_EVERY, 2 * STEPS_PER_EPOCH}

    shown = EventAccumulator(str(art / TENSORBOARD), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    shown.Reload()
    rows = read_metrics(art)
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for key in (k for k in rows[0] if k not in NOT_LOGGED):
        logged = [(e.step, e.value) for e in shown.Scalars(key)]
        assert [s for s, _ in logged] == [r["step"] for r in rows], key
        assert [v for _, v in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    step_losses = [e.step for e in shown.Scalars("train/step_loss")]
    assert step_losses == list(range(LOG_EVERY, 2 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    for key in ("valid/reconstructions", "prior/samples"):  # the PNGs of images/, as written
        with Image.open(art / "images" / f"epoch-002-{key.split('/')[1]}.png") as png:
            assert [(e.step, e.width) for e in shown.Images(key)] == [(r["step"], png.width) for r in rows], key

    texts = shown.Tensors("config/text_summary")
    assert [t.step for t in texts] == [0, STEPS_PER_EPOCH]  # the resumed run records the config it runs under
    text = texts[-1].tensor_proto.string_val[0].decode()
    assert json.loads(text) == json.loads((art / "config.json").read_text())
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = shown.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["model.kind"].string_value == "mlp" and hparams["epochs"].number_value == 2
