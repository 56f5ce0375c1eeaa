"""A sweep's comparison: `sweep.json`, `sweep.csv` and `sweep.html` in the sweep's workdir, one row per variant.

The rows are recomputed from the variants' workdirs (their `variant.json` records, `summary.json` and newest
checkpoint), so the jobs of a sharded sweep each write a comparison of every variant finished so far. A row holds
the variant's overrides, status ("done", "failed" with its error, "running", "pending"), each phase's validation
accuracy and loss, the test accuracy and loss, and its training time (its own phases; the shared phases' time
apart). The best variant is the one with the highest validation accuracy after its last phase (of the weights its
test used: the EMA's where the phase scores with it; of equals, the lowest validation loss); the test split never
picks it, it only reports.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import socket
from typing import Any, Callable, Sequence

from tljax.reporting import pages, plots
from tljax.research import sweep_runner, sweeps
from tljax.training import checkpoint
from tljax.training import workdir as workdir_lib

SELECTION = ("the best variant has the highest validation accuracy after its last phase (of equals, the lowest "
             "validation loss); the test split never picks the winner (its accuracy is reported only)")


def _read(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _history(workdir: str) -> list[dict[str, Any]]:
    """The epochs' validation of the newest checkpoint in `workdir` (none without a checkpoint)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        latest = ckpt.latest_meta()
    finally:
        ckpt.close()
    return latest[1]["history"] if latest else []


def rows(root: str, runs: Sequence[sweeps.Variant] = ()) -> list[dict[str, Any]]:
    """One row per variant in `root`: those of `runs` first, in their order ("pending" where not started), then any
    other variant found there, by name. The best one is marked ("best": True)."""
    found = sorted(n for n in os.listdir(root) if not n.startswith(("_", ".")) and
                   os.path.isfile(os.path.join(root, n, sweep_runner.RECORD))) if os.path.isdir(root) else []
    overrides = {v.name: v.overrides for v in runs}
    out = []
    for name in list(overrides) + [n for n in found if n not in overrides]:
        workdir = os.path.join(root, name)
        record = _read(os.path.join(workdir, sweep_runner.RECORD)) or {
            "name": name, "overrides": overrides[name], "status": "pending", "error": None, "seconds": None,
            "shared": []}
        summary = _read(os.path.join(workdir, "summary.json")) if record["status"] == "done" else None
        shared = [_read(os.path.join(sweep_runner.shared_dir(root, p["key"]), sweep_runner.DONE)) for p in
                  record["shared"]]
        row = {**record, "phases": [], "val_accuracy": None, "val_loss": None, "test_accuracy": None,
               "test_loss": None,
               "shared_seconds": sum(s["seconds"] for s in shared if s) if record["shared"] else None, "best": False}
        if summary:
            val = "val_ema" if summary.get("weights") == "ema" else "val"
            row.update(phases=[{k: v for k, v in p.items() if k.startswith(("name", "val_"))}
                               for p in summary["phases"]],
                       val_accuracy=summary["phases"][-1][f"{val}_accuracy"],
                       val_loss=summary["phases"][-1][f"{val}_loss"], test_accuracy=summary["test_accuracy"],
                       test_loss=summary["test_loss"])
        out.append(row)
    scored = [r for r in out if r["val_accuracy"] is not None]
    if scored:
        max(scored, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["best"] = True
    return out


Column = tuple[str, Callable[[dict], Any], Callable[[Any], str]]  # header, a row's value, its display


def _columns(table: list[dict[str, Any]]) -> list[Column]:
    """The CSV's and the page's columns: the swept fields, per-phase validation, test, time."""
    fields = list(dict.fromkeys(k for r in table for k in r["overrides"]))
    phases = max((len(r["phases"]) for r in table), default=0)
    score, seconds, plain = "{:.4f}".format, "{:.1f}".format, str
    columns: list[Column] = [("best", lambda r: r["best"], lambda v: "&#9733;" if v else ""),
                             ("name", lambda r: r["name"], plain), ("status", lambda r: r["status"], plain)]
    columns += [(f, lambda r, f=f: r["overrides"].get(f), sweeps.label) for f in fields]
    for i in range(phases):
        for metric in ("accuracy", "loss"):
            columns.append((f"phase{i + 1}_val_{metric}",
                            lambda r, i=i, m=metric: r["phases"][i][f"val_{m}"] if i < len(r["phases"]) else None,
                            score))
    shown = {"test_accuracy": score, "test_loss": score, "seconds": seconds, "shared_seconds": seconds, "error": plain}
    columns += [(key, lambda r, key=key: r[key], show) for key, show in shown.items()]
    return columns


def _cell(value: Any, show: Callable[[Any], str]) -> str:
    """A table cell whose data-value sorts: numbers (and booleans) by value, text as text, nothing ("") last."""
    if value is None:
        return '<td data-value="">-</td>'
    shown = show(value) if isinstance(value, bool) else html.escape(show(value))
    if isinstance(value, (int, float)):
        return f'<td class="num" data-value="{float(value)!r}">{shown}</td>'
    sort = value if isinstance(value, str) else sweeps.label(value)
    return f'<td data-value="{html.escape(sort)}">{shown}</td>'


# Clicking a header sorts the rows by its column (numbers by value, empty cells last); a second click reverses.
_SORT = """
document.querySelectorAll("table.sortable th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  th.parentNode.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const value = row => row.cells[column].dataset.value;
  const order = (a, b) => {
    const x = value(a), y = value(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    const c = (isNaN(x) || isNaN(y)) ? x.localeCompare(y) : Number(x) - Number(y);
    return ascending ? c : -c;
  };
  [...body.rows].sort(order).forEach(row => body.appendChild(row));
}));
"""


def render(root: str, table: list[dict[str, Any]]) -> str:
    """The comparison page: the sortable table, the score against each swept value, all learning curves."""
    columns = _columns(table)
    head = "".join(f'<th title="click to sort">{html.escape(h)}</th>' for h, _, _ in columns)
    body = "".join(f'<tr id="variant-{html.escape(r["name"])}">'
                   + "".join(_cell(get(r), show) for _, get, show in columns) + "</tr>" for r in table)
    done = [r for r in table if r["val_accuracy"] is not None]
    best = next((r for r in table if r["best"]), None)
    figures = ""
    if done:
        fields = list(dict.fromkeys(k for r in done for k in r["overrides"]))
        swept = {f: [v if isinstance(v, (int, float)) and not isinstance(v, bool) else sweeps.label(v)
                     for v in (r["overrides"].get(f) for r in done)] for f in fields}
        if swept:
            figures += "<h2>Validation accuracy against each swept value</h2>" + pages.figure(
                lambda f: plots.sweep_scores(f, swept, [r["val_accuracy"] for r in done]), "scores")
    histories = {r["name"]: h for r in table if (h := _history(os.path.join(root, r["name"])))}
    if histories:
        figures += ("<h2>Learning curves</h2><p>Validation loss and accuracy after every epoch.</p>"
                    + pages.figure(lambda f: plots.sweep_curves(f, histories), "learning curves"))
    counts = ", ".join(f"{sum(r['status'] == s for r in table)} {s}" for s in ("done", "failed", "running", "pending")
                       if any(r["status"] == s for r in table))
    winner = (f"Best: <b>{html.escape(best['name'])}</b>, validation accuracy {best['val_accuracy']:.4f}."
              if best else "No variant has finished yet.")
    title = f"tljax sweep: {os.path.basename(os.path.abspath(root))}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{pages.STYLE} th {{ cursor: pointer; }} th[aria-sort=ascending]::after {{ content: " \\25B2"; }}
th[aria-sort=descending]::after {{ content: " \\25BC"; }}
table.sortable td:last-child {{ min-width: 25em; font-size: 0.85em; }}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(table)} variants ({counts}). {winner} {html.escape(SELECTION[0].upper() + SELECTION[1:])}. Click a column's
header to sort by it.</p>
<div style="overflow-x: auto"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>
{figures}
<script>{_SORT}</script>
</body></html>
"""


def text(table: list[dict[str, Any]]) -> str:
    """The comparison as lines of text for the terminal, with the best variant and the selection rule."""
    def number(v: float | None, digits: int = 4) -> str:
        return f"{'-' if v is None else f'{v:.{digits}f}':>8}"

    width = max([len(r["name"]) for r in table] + [7])
    lines = [f"  {'variant':{width}}  status    val_acc  test_acc  seconds"]
    for r in table:
        lines.append(f"{'*' if r['best'] else ' '} {r['name']:{width}}  {r['status']:7}  {number(r['val_accuracy'])}"
                     f"  {number(r['test_accuracy'])} {number(r['seconds'], 1)}"
                     + (f"  {r['error'][:200]}" if r["error"] else ""))
    best = next((r for r in table if r["best"]), None)
    lines.append(f"* best: {best['name']}" if best else "no variant has finished")
    lines.append(f"  ({SELECTION})")
    return "\n".join(lines)


def _replace(path: str, text: str) -> None:
    """Replaces `path` with `text` atomically, through a temporary file of its own: the jobs of a sharded sweep may
    write the comparison at the same time."""
    temporary = f"{workdir_lib.temporary_path(path)}.{socket.gethostname()}.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(temporary, path)


def write(root: str, runs: Sequence[sweeps.Variant] = ()) -> list[dict[str, Any]]:
    """Writes sweep.json, sweep.csv and sweep.html in `root` (each atomically) and returns the rows."""
    table = rows(root, runs)
    best = next((r["name"] for r in table if r["best"]), None)
    _replace(os.path.join(root, "sweep.json"),
             json.dumps({"best": best, "selection": SELECTION, "variants": table}, indent=1))
    columns = _columns(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([h for h, _, _ in columns])
    for r in table:
        values = (get(r) for _, get, _ in columns)
        writer.writerow([json.dumps(v) if isinstance(v, (list, dict)) else v for v in values])
    _replace(os.path.join(root, "sweep.csv"), buffer.getvalue())
    _replace(os.path.join(root, "sweep.html"), render(root, table))
    return table
