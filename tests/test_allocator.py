"""Commands restart once under tcmalloc where it is installed (`tljax.allocator`), before anything heavy loads, and
tcmalloc removes the page faults of the buffers XLA allocates afresh at every call."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from tljax import allocator

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("main", "predict", "evaluate", "export", "report", "sweep", "probe")
LIB = "libtcmalloc_minimal.so.4"


def test_tcmalloc_is_preloaded_before_other_libraries_and_told_to_keep_its_memory():
    assert allocator.environment({"PATH": "/bin"}, LIB) == {
        "PATH": "/bin", "LD_PRELOAD": LIB, "TCMALLOC_RELEASE_RATE": "0"}
    env = allocator.environment({"LD_PRELOAD": "libfoo.so", "TCMALLOC_RELEASE_RATE": "2"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB} libfoo.so" and env["TCMALLOC_RELEASE_RATE"] == "2"


@pytest.mark.parametrize("env, library", [
    ({}, None),  # not installed
    ({"TLJAX_ALLOCATOR": "system"}, LIB),  # the user's choice
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIB),  # another allocator already preloaded
    ({"LD_PRELOAD": f"/opt/{LIB}"}, LIB),  # already running under it
])
def test_nothing_changes_without_tcmalloc_by_choice_or_when_an_allocator_is_preloaded(env, library):
    assert allocator.environment(env, library) is None


def _run(code: str, env: dict[str, str], *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is the Linux loader's")
def test_relaunch_runs_the_same_command_line_again_once_with_the_library_preloaded():
    # libc itself stands in for tcmalloc: preloading it changes nothing, so the test needs no tcmalloc
    code = """
        import os, sys
        print("started")
        from tljax import allocator
        allocator.tcmalloc = lambda: "libc.so.6"
        allocator.relaunch()
        print(os.environ["LD_PRELOAD"], os.environ["TCMALLOC_RELEASE_RATE"], sys.argv[1:])
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TCMALLOC_RELEASE_RATE", "TLJAX_ALLOCATOR")}
    # the first process prints "started" before it relaunches: stdout is flushed before the exec, so it shows
    assert _run(code, env, "a", "b c") == ["started", "started", "libc.so.6 0 ['a', 'b c']"]
    assert _run(code, {**env, "TLJAX_ALLOCATOR": "system", "LD_PRELOAD": "", "TCMALLOC_RELEASE_RATE": "-"}) == [
        "started", " - []"]


@pytest.mark.skipif(allocator.tcmalloc() is None, reason="tcmalloc is not installed (libtcmalloc-minimal4)")
def test_tcmalloc_removes_the_page_faults_of_xla_s_fresh_buffers():
    # Each call's 64 MiB output is a fresh block; glibc maps and unmaps it: 16,384 faults of 4 KiB pages a call
    # (tcmalloc still maps a new block now and then: the median call is compared)
    code = """
        import resource
        import jax, jax.numpy as jnp
        x = jnp.ones((4096, 4096), jnp.float32)
        double = jax.jit(lambda x: x * 2)
        for _ in range(2):  # compilation; tcmalloc's first block
            jax.block_until_ready(double(x)).delete()
        faults = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            jax.block_until_ready(double(x)).delete()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(sorted(faults)[2])  # the median call
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TCMALLOC_RELEASE_RATE")}
    glibc = int(_run(code, env)[-1])
    tcmalloc = int(_run(code, allocator.environment(env, allocator.tcmalloc()))[-1])
    assert glibc > 8000, glibc
    assert tcmalloc < glibc / 10, (tcmalloc, glibc)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_relaunches_before_its_other_imports(command):
    body = ast.parse((ROOT / "tljax" / f"{command}.py").read_text()).body
    statements = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    assert [ast.unparse(s) for s in statements[:3]] == [
        "from __future__ import annotations", "from tljax import allocator",
        "if __name__ == '__main__':\n    allocator.relaunch()"]
