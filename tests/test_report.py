"""`tljax.report`: one self-contained HTML page whose figures decode, whose numbers are the run's, and which a
browser renders with every figure loaded."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
import tensorflow as tf

from tests import browser
from tests.tool_util import snapshot, tool
from tljax import report
from tljax.runs import restore


@pytest.fixture(scope="module")
def page(trained_run, tmp_path_factory):
    _, workdir = trained_run
    before = snapshot(workdir)
    output = tmp_path_factory.mktemp("report") / "report.html"
    result = tool("report", f"--workdir={workdir}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(workdir) == before
    return output, json.loads((workdir / "summary.json").read_text())


def _row(text: str, row_id: str) -> list[str]:
    row = re.search(rf'<tr id="{row_id}">(.*?)</tr>', text).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_embedded_images_decode_and_numbers_match_the_summary(page):
    path, summary = page
    text = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4  # learning curves, learning rate, confusion matrix, most wrong
    for data in images:
        height, width, _ = tf.io.decode_png(base64.b64decode(data)).shape
        assert height > 100 and width > 100
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing outside the file
    test = _row(text, "test")
    assert test[2:4] == [f"{summary['test_accuracy']:.4f}", f"{summary['test_loss']:.4f}"]
    assert _row(text, "test-evaluated")[2] == test[2]
    for k, phase in enumerate(summary["phases"]):
        cells = _row(text, f"val-{k}")
        assert phase["name"] in cells[0]
        assert cells[1:4] == [str(phase["steps"]), f"{phase['val_accuracy']:.4f}", f"{phase['val_loss']:.4f}"]


def test_applied_learning_rates_follow_each_phases_schedule(trained_run):
    _, workdir = trained_run
    run = restore.load(str(workdir))
    summary = json.loads((workdir / "summary.json").read_text())
    run.config.phases[1].schedule = {"name": "cosine_decay_schedule", "init_value": "learning_rate",
                                     "decay_steps": "phase_steps"}
    (head1, rates1, backbone1), (head2, rates2, backbone2) = report.applied_learning_rates(run, summary["phases"])
    assert (head1, head2) == ("head", "all")
    assert backbone1 is None and (rates1 == 1e-2).all()  # phase 1 freezes the backbone
    assert len(rates2) == summary["phases"][1]["steps"] and rates2[0] == pytest.approx(1e-2)
    assert rates2[-1] < rates2[0] / 20 and (backbone2 == rates2).all()


def test_a_browser_renders_the_page_with_every_figure_loaded(page, tmp_path):
    path, summary = page
    probe = tmp_path / "probe.html"  # the page plus a script that records what the browser made of the images
    probe.write_text(path.read_text().replace("</body>", """<script>
      const imgs = [...document.images];
      document.body.setAttribute("data-probe",
        imgs.length + ":" + imgs.filter(i => i.complete && i.naturalWidth > 0).length);
    </script></body>"""))
    result = browser.dump_dom(probe)
    assert 'data-probe="4:4"' in result.stdout, result.stderr[-2000:]
    assert f"{summary['test_accuracy']:.4f}" in result.stdout


def test_an_unfinished_run_is_refused(trained_run, tmp_path):
    _, workdir = trained_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    (copy / "summary.json").unlink()
    with pytest.raises(restore.RunNotFoundError, match="has not finished"):
        report.write(str(copy))
