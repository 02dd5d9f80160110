"""The end-of-run summary: every metric per epoch, best and worst marked (as burn-train's)."""

from __future__ import annotations

from typing import Any, Sequence

def format_summary(history: list[dict[str, Any]], terms: Sequence[str]) -> str:
    """A plain-text table: one row per epoch, one column per metric; in each column the
    best value is marked '*' and the worst '!'. ``terms``: the family's loss terms, train/ and
    valid/ of each shown (all losses: lower is better)."""
    if not history:
        return "no epochs completed"
    wanted = [f"{split}/{t}" for split in ("train", "valid") for t in terms]
    keys = [k for k in wanted if any(k in row for row in history)]
    marks: dict[tuple[int, str], str] = {}
    for key in keys:
        vals = [(row[key], i) for i, row in enumerate(history) if key in row]
        if len(vals) > 1:
            marks[(min(vals)[1], key)] = "*"
            marks[(max(vals)[1], key)] = "!"
    header = ["epoch", "step", *keys]
    rows = []
    for i, row in enumerate(history):
        cells = [str(row.get("epoch", i + 1)), str(row.get("step", ""))]
        for key in keys:
            cells.append(f"{row[key]:.3f}{marks.get((i, key), ' ')}" if key in row else "-")
        rows.append(cells)
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = ["Summary (nats per image; * best, ! worst)", line(header), sep] + [line(r) for r in rows]
    return "\n".join(out)
