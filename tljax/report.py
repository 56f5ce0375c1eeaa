"""`python -m tljax.report --workdir=DIR [--output=DIR/report.html]`: one self-contained HTML page about a run.

The page holds the run's results (validation accuracy per phase, test accuracy and loss, from summary.json), the
learning curves of all phases with the phase boundaries marked, the learning-rate schedule the optimizer applied
(the same optax schedule, evaluated at every step of every phase), the test set's confusion matrix, per-class
scores and most-wrong examples (an evaluation of the final checkpoint, as `tljax.evaluate` makes it), the recipe
changes a resume was allowed to make (`config.allow_recipe_change`: step, field, old and new value), and the
config. Figures are PNGs embedded as data URIs and the style sheet is inline, so the one file can be mailed or
archived and opens in any browser offline. Only the HTML file is written.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import html
import json
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags

from tljax import cli, evaluate
from tljax.reporting import pages, plots
from tljax.runs import restore
from tljax.training import optim

FLAGS = flags.FLAGS


def _table(header: list[str] | None, rows: list[list[Any]], ids: list[str] | None = None) -> str:
    """An HTML table; floats printed with 4 decimals in right-aligned cells, row i's id from `ids`."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:.4f}</td>'
        return f"<td>{html.escape('-' if v is None else str(v))}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join((f'<tr id="{ids[i]}">' if ids else "<tr>") + "".join(cell(v) for v in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table>{head}{body}</table>"


def applied_learning_rates(run: restore.TrainedRun, phase_results: list[dict]) -> list[tuple[str, np.ndarray,
                                                                                              np.ndarray | None]]:
    """(phase name, head rate per step, backbone rate per step or None if the backbone is frozen) per phase.

    Each phase starts a fresh optimizer, so its schedule counts from 0; the rates are the phase's optax schedule
    (`optim.learning_rate`) at each of its steps, the backbone's scaled by `backbone_lr_multiplier`.
    """
    out = []
    for phase, result in zip(run.config.phases, phase_results):
        steps = int(result["steps"])
        lr = optim.learning_rate(phase, steps)
        head = np.asarray(jax.vmap(lr)(np.arange(steps)) if callable(lr) else np.full(steps, lr), np.float64)
        labels = optim.param_labels(run.variables["params"], phase.trainable)
        trains_backbone = any(label == "backbone" for label in jax.tree.leaves(labels))
        out.append((phase.name, head, head * phase.backbone_lr_multiplier if trains_backbone else None))
    return out


def recipe_changes(meta: dict[str, Any]) -> str:
    """The recipe changes recorded in a checkpoint's meta as a table (a sentence when there were none)."""
    rows = [[entry["step"], change["field"], json.dumps(change["old"]), json.dumps(change["new"])]
            for entry in meta["recipe_changes"] for change in entry["changes"]]
    if not rows:
        return "<p>None: every step trained with the recipe of the config below.</p>"
    return ("<p>Resumes allowed to change the recipe (<code>config.allow_recipe_change</code>); from the step "
            "given on, the new value applied. The config below holds the newest values.</p>"
            + _table(["from step", "field", "before", "after"], rows, ids=[f"recipe-{i}" for i in range(len(rows))]))


def render(run: restore.TrainedRun, summary: dict[str, Any], ev: evaluate.Evaluation) -> str:
    """The report page as one HTML string."""
    cfg, scores = run.config, ev.scores()
    title = f"{run.description['name']} on {cfg.data.source}"
    overview = _table(None, [
        ["model", run.description["name"]], ["pretrained weights", cfg.model.weights],
        ["data", f"{cfg.data.source} ({len(run.class_names)} classes, {cfg.data.image_size} px)"],
        ["normalization", cfg.data.normalization], ["checkpoint step", run.step],
        ["weights tested and exported", "their moving average (EMA)" if run.weights == "ema" else "as trained"],
        ["parameters", f"{summary['num_params']:,}"],
        ["trainable per phase", ", ".join(f"{n:,}" for n in summary["num_trainable_params_per_phase"])],
    ])
    phases = summary["phases"]
    rows, ids = [], []
    for k, p in enumerate(phases):  # the raw weights' validation, and the EMA's where the phase kept one
        for key, what in (("val", "validation"), ("val_ema", "validation of the EMA")):
            if f"{key}_loss" in p:
                rows.append([f"{what} after phase {k + 1} ({p['name']})", p["steps"], p[f"{key}_accuracy"],
                             p[f"{key}_loss"], None])
                ids.append(f"{key.replace('_', '-')}-{k}")
    results = _table(
        ["", "steps", "accuracy", "loss", "top-5 accuracy"],
        rows + [["test (summary.json)", None, summary["test_accuracy"], summary["test_loss"],
                 summary.get("test_top5_accuracy")],
                [f"test, evaluated for this report ({scores['examples']} examples)", None, scores["accuracy"],
                 scores["loss"], scores["top5_accuracy"]]],
        ids=ids + ["test", "test-evaluated"])
    names = [p.name for p in cfg.phases]
    curves = pages.figure(lambda f: plots.learning_curves(f, run.meta["history"], names), "learning curves")
    rates = pages.figure(lambda f: plots.learning_rates(f, applied_learning_rates(run, phases)), "learning rates")
    matrix = pages.figure(lambda f: plots.confusion_matrix(f, ev.confusion, run.class_names), "confusion matrix")
    wrong = pages.figure(lambda f: plots.image_grid(f, ev.wrong_images, ev.wrong_titles()), "most wrong")
    per_class = _table(["class", "precision", "recall", "F1", "support"],
                       [[name, s["precision"], s["recall"], s["f1"], int(s["support"])]
                        for name, s in scores["per_class"].items()])
    config = html.escape(cfg.to_json_best_effort(indent=1))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tljax: {html.escape(title)}</title>
<style>{pages.STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Run <code>{html.escape(os.path.basename(os.path.abspath(run.workdir)))}</code>, trained by tljax in
{len(phases)} phase(s): {html.escape(", ".join(names))}.</p>
{overview}
<h2>Results</h2>
{results}
<h2>Recipe changes</h2>
{recipe_changes(run.meta)}
<h2>Learning curves</h2>
<p>Train and validation loss and accuracy after every epoch; dashed lines mark where each phase begins.</p>
{curves}
<h2>Learning rate</h2>
<p>The rate the optimizer applied at every step (the backbone's where it trains).</p>
{rates}
<h2>Test set</h2>
<p>Split <code>{html.escape(ev.split)}</code> of {html.escape(ev.source)}, {scores['examples']} examples.</p>
<h3>Confusion matrix</h3>
{matrix}
<h3>Per class</h3>
{per_class}
<h3>Most wrong</h3>
<p>The misclassified test examples the model was surest about, as it saw them (before normalization).</p>
{wrong}
<h2>Config</h2>
<pre>{config}</pre>
</body></html>
"""


def write(workdir: str, output: str = "") -> str:
    """Evaluates the final checkpoint on the test split and writes the report; returns its path."""
    run = restore.load(workdir)
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        raise restore.RunNotFoundError(f"{workdir} has no summary.json: the run has not finished. Rerun its "
                                       "training command with the same --workdir to complete it")
    with open(path) as f:
        summary = json.load(f)
    page = render(run, summary, evaluate.evaluate(run, "test"))
    output = output or os.path.join(workdir, "report.html")
    with open(output, "w", encoding="utf-8") as f:
        f.write(page)
    return output


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a program (other modules import its functions)."""
    flags.DEFINE_string("workdir", None, "The run's workdir (written by tljax.main).")
    flags.DEFINE_string("output", "", "The HTML file to write ('' = WORKDIR/report.html).")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(write(FLAGS.workdir, FLAGS.output))


if __name__ == "__main__":
    _define_flags()
    app.run(cli.command(main, evaluate.EvaluationError))
