"""Tests for format_summary: the per-epoch table with the loss's best/worst marks."""

from __future__ import annotations

from vae_dist.training.tracking import format_summary

TERMS = ("loss", "recon", "kl")


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows of cells) from the rendered table."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[1:]


def _column(text: str, key: str) -> list[str]:
    header, rows = _table(text)
    i = header.index(key)
    return [r[i] for r in rows]


def _history() -> list[dict]:
    return [
        {"epoch": 1, "step": 10, "train/loss": 300.0, "valid/loss": 250.0, "train/kl": 5.0, "valid/kl": 9.0},
        {"epoch": 2, "step": 20, "train/loss": 200.0, "valid/loss": 260.0, "train/kl": 15.0, "valid/kl": 8.0},
        {"epoch": 3, "step": 30, "train/loss": 250.0, "valid/loss": 240.0, "train/kl": 10.0, "valid/kl": 7.5},
    ]


def test_best_and_worst_marked_for_the_loss_only():
    text = format_summary(_history(), TERMS)
    assert _column(text, "train/loss") == ["300.000!", "200.000*", "250.000"]
    assert _column(text, "valid/loss") == ["250.000", "260.000!", "240.000*"]
    # A part of the loss is not a score: the lowest KL is no better.
    assert _column(text, "train/kl") == ["5.000", "15.000", "10.000"]
    assert _column(text, "valid/kl") == ["9.000", "8.000", "7.500"]


def test_epoch_and_step_columns():
    header, rows = _table(format_summary(_history(), TERMS))
    assert header[:2] == ["epoch", "step"]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[1] for r in rows] == ["10", "20", "30"]


def test_one_epoch_has_no_marks():
    text = format_summary(_history()[:1], TERMS)
    header, rows = _table(text)
    assert len(rows) == 1
    assert not any(c.endswith(("*", "!")) for c in rows[0])
    assert "300.000" in rows[0]


def test_empty_history():
    assert format_summary([], TERMS) == "no epochs completed"


def test_missing_keys():
    history = [
        {"epoch": 1, "step": 5, "train/loss": 10.0},
        {"epoch": 2, "step": 10, "train/loss": 8.0, "valid/loss": 9.0},
        {"epoch": 3, "step": 15, "train/loss": 12.0, "valid/loss": 7.0},
    ]
    text = format_summary(history, TERMS)
    header, rows = _table(text)
    # Columns absent from every row are left out; the others are kept.
    assert "train/recon" not in header and "valid/kl" not in header
    assert "train/loss" in header and "valid/loss" in header
    assert _column(text, "valid/loss") == ["-", "9.000!", "7.000*"]
    assert _column(text, "train/loss") == ["10.000", "8.000*", "12.000!"]


def test_rows_without_epoch_or_step_are_numbered():
    text = format_summary([{"train/loss": 2.0}, {"train/loss": 1.0}], TERMS)
    _, rows = _table(text)
    assert [r[0] for r in rows] == ["1", "2"]
    assert [r[1] for r in rows] == ["", ""]


def test_table_lines_have_equal_width():
    text = format_summary(_history(), TERMS)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(line) for line in lines}) == 1
    assert "* best" in text and "! worst" in text

