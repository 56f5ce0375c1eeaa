"""Host memory through tcmalloc where the system has it: each command restarts itself once with it preloaded.

Why: XLA's CPU runtime allocates a step's temporary buffers afresh at every call (2.2 GB for ResNet-50's phase-2
step at 160 px, batch 32). glibc's malloc serves and returns blocks that large with mmap/munmap, so the kernel maps
and zeroes every page again at every step: 540,000 page faults and 1.2 s of system time in a 3.6 s step, measured
on a 2-core machine. tcmalloc (gperftools; Debian/Ubuntu `libtcmalloc-minimal4`, the allocator TensorFlow's
performance guide recommends) keeps freed memory for the next call when told never to release it
(`TCMALLOC_RELEASE_RATE=0`): ResNet-50 eval 1.24x, phase 2 1.34x and the input pipeline 1.25x in one run. glibc's
own settings that keep the memory were measured and not kept (README: Speed).

The dynamic loader reads LD_PRELOAD only when a process starts, so a command that finds tcmalloc installed and not
yet loaded executes itself again, with the same arguments, before it imports anything heavy. Nothing happens where
tcmalloc is not installed, where LD_PRELOAD already names tcmalloc or jemalloc, or with `TLJAX_ALLOCATOR=system`.
Library users (notebooks, scripts) preload it themselves:
`LD_PRELOAD=libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0 python my_script.py`.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

OPT_OUT = "TLJAX_ALLOCATOR"  # "system": keep the C library's malloc
_PRELOADED = ("tcmalloc", "jemalloc")


def tcmalloc() -> str | None:
    """The installed tcmalloc's library name for LD_PRELOAD, or None."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def environment(env: dict[str, str], library: str | None) -> dict[str, str] | None:
    """`env` with `library` preloaded and never releasing memory, or None where nothing is to change."""
    preload = env.get("LD_PRELOAD", "")
    if library is None or env.get(OPT_OUT) == "system" or any(n in preload for n in (library, *_PRELOADED)):
        return None
    return {"TCMALLOC_RELEASE_RATE": "0", **env, "LD_PRELOAD": " ".join(filter(None, [library, preload]))}


def relaunch() -> None:
    """Executes this process's command line again under tcmalloc (see the module's docstring); returns only where
    nothing is to be done."""
    if sys.platform != "linux":
        return
    env = environment(dict(os.environ), tcmalloc())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
