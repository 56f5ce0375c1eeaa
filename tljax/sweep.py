"""Command line: `python -m tljax.sweep --config=configs/quickstart.py --workdir=runs/sweep
--sweep=configs/sweeps/quickstart.py`: every variant of a sweep as an ordinary run in `workdir/<name>/`, and a
comparison of them all (`workdir/sweep.json`, `sweep.csv`, `sweep.html`).

The variants come from a sweep file (`get_sweep()`, see `tljax.research.sweeps`) and from repeated `--grid
'field.path=v1,v2'` flags: the product of all of them (a field swept twice is refused). `--config.x=y` overrides
apply to every variant. Phases that variants share are trained once (`tljax.research.sweep_runner`). Rerunning the
command skips finished variants and resumes interrupted ones. `--variant_shard=i/n` runs variants i, i + n, ... of
them, so that n jobs share a sweep; each job is one process, on its machine's devices. Exit status: 0 when every
variant of this job finished, 1 when one failed (the others still ran; the comparison gives each one's error), 75 when
SIGTERM stopped it after saving (rerun to resume).
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from tljax import cli
from tljax.research import sweep_report, sweep_runner, sweeps
from tljax.training import preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: one workdir per variant, the comparison.")
_SWEEP = flags.DEFINE_string("sweep", "", "A sweep file: get_sweep() returns a list of override dicts.")
_GRID = flags.DEFINE_multi_string("grid", [], "'field.path=v1,v2,...': one more swept field (repeatable).")
_SHARD = flags.DEFINE_string("variant_shard", "0/1", "i/n: this job runs variants i, i + n, i + 2n, ... (0-based).")
_STALE = flags.DEFINE_float("lock_stale_s", 600.0, "A shared prefix's lock not refreshed for this many seconds is "
                            "taken over (its job died).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _SWEEP.value and not _GRID.value:
        raise app.UsageError("give a sweep file (--sweep) or at least one --grid")
    base, workdir = _CONFIG.value, _WORKDIR.value
    shard = sweeps.shard(_SHARD.value)
    sources = [sweeps.load(_SWEEP.value)] if _SWEEP.value else []
    sources += [sweeps.product(sweeps.grid(text, base)) for text in _GRID.value]
    fixed = config_flags.get_override_values(flags.FLAGS["config"])
    runs = sweeps.variants(base, sweeps.combine(*sources), fixed)
    os.makedirs(workdir, exist_ok=True)
    try:
        records = sweep_runner.run(workdir, runs, shard, stale_s=_STALE.value)
    except preemption.Preempted:
        sys.exit(preemption.EXIT_STATUS)  # the run logged where it saved
    table = sweep_report.write(workdir, runs)
    print(sweep_report.text(table))
    print("comparison: " + ", ".join(os.path.join(workdir, f"sweep.{ext}") for ext in ("json", "csv", "html")))
    failed = [r["name"] for r in records if r["status"] != "done"]
    if failed:
        sys.exit(f"{len(failed)} variant(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    app.run(cli.command(main))
