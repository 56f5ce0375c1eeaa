""".ci/run, Chromium and tcmalloc: where CI runs as root with apt it must get both or stop, and a browser it has must
make the report's browser test run (not skip). It removes the environment it made, whatever the tests' outcome.
Run against stand-ins for id, apt-get, ldconfig, python3, pip and python, so that nothing is installed and no test
suite runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parents[1] / ".ci" / "run"

STUBS = {
    "id": "print(os.environ['FAKE_UID'])",
    # `apt-get install` "installs" chromium and tcmalloc when FAKE_APT=ok, and fails otherwise (no network, no such
    # package).
    "apt-get": """if os.environ['FAKE_APT'] != 'ok':
    sys.exit(100)
if 'install' in sys.argv:
    chromium = Path(os.environ['STUBS']) / 'chromium'
    chromium.write_text('#!/bin/sh\\n')
    chromium.chmod(0o755)
    if 'libtcmalloc-minimal4' in sys.argv:
        (Path(os.environ['STUBS']) / 'tcmalloc-installed').touch()""",
    # `ldconfig -p` lists tcmalloc once it is "installed".
    "ldconfig": """if (Path(os.environ['STUBS']) / 'tcmalloc-installed').exists():
    print('\\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => /usr/lib/libtcmalloc_minimal.so.4')""",
    "python3": "(Path(sys.argv[3]) / 'bin').mkdir(parents=True); (Path(sys.argv[3]) / 'bin' / 'activate').touch()",
    "pip": "",
    # `python -m pytest`: records whether the browser test would be required, and exits with FAKE_PYTEST_RC.
    "python": """Path(os.environ['RECORD']).write_text(os.environ.get('TLJAX_REQUIRE_BROWSER', 'unset'))
sys.exit(int(os.environ['FAKE_PYTEST_RC']))""",
}


def _run_ci(tmp_path: Path, uid: int, apt: str | None,
            pytest_rc: int = 0) -> tuple[subprocess.CompletedProcess, str | None]:
    """.ci/run with PATH holding only the stand-ins (and apt-get only if `apt`) and the tools it needs."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        if name == "apt-get" and apt is None:
            continue
        script = stubs / name
        script.write_text(f"#!{sys.executable}\nimport os, sys\nfrom pathlib import Path\n{body}\n")
        script.chmod(0o755)
    for tool in ("dirname", "mktemp", "rm"):
        (stubs / tool).symlink_to(shutil.which(tool))
    record = tmp_path / "record"
    env = {"PATH": str(stubs), "STUBS": str(stubs), "FAKE_UID": str(uid), "FAKE_APT": apt or "", "RECORD": str(record),
           "FAKE_PYTEST_RC": str(pytest_rc), "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run([shutil.which("bash"), str(CI)], env=env, capture_output=True, text=True, timeout=60)
    return result, record.read_text() if record.exists() else None


def test_ci_stops_when_it_cannot_install_chromium_and_tcmalloc_as_root_with_apt(tmp_path):
    result, record = _run_ci(tmp_path, uid=0, apt="fails")
    assert result.returncode != 0
    assert "could not install chromium libtcmalloc-minimal4" in result.stderr
    assert record is None  # the tests never started


def test_ci_requires_the_browser_test_once_chromium_is_installed(tmp_path):
    result, record = _run_ci(tmp_path, uid=0, apt="ok")
    assert result.returncode == 0, result.stderr
    assert record == "1"
    assert (tmp_path / "stubs" / "tcmalloc-installed").exists()


@pytest.mark.parametrize("uid, apt", [(1000, "ok"), (0, None)], ids=["not-root", "no-apt"])
def test_ci_without_a_way_to_install_lets_the_browser_test_skip(tmp_path, uid, apt):
    result, record = _run_ci(tmp_path, uid=uid, apt=apt)
    assert result.returncode == 0, result.stderr
    assert record == "unset"
    assert not (tmp_path / "stubs" / "chromium").exists()


@pytest.mark.parametrize("pytest_rc", [0, 1])
def test_ci_removes_its_environment_and_keeps_the_tests_exit_status(tmp_path, pytest_rc):
    result, record = _run_ci(tmp_path, uid=1000, apt=None, pytest_rc=pytest_rc)
    assert record is not None  # the (stand-in) tests ran, in an environment under TMPDIR
    assert result.returncode == pytest_rc, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record", "stubs"]
