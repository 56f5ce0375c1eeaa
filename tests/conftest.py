"""Test-wide settings: Keras on the JAX backend, exact float32 matmuls for parity checks, quiet TensorFlow, no
triton; a process that does not exit after the session fails with every thread's stack."""

import faulthandler
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
# The parity extra's torch (the CUDA build torchvision needs, run on CPU) imports triton lazily, e.g. when an
# optimizer is built; triton's native library crashes the process when TensorFlow was loaded first. The tests run
# torch on CPU only, where triton is never used: make its import fail cleanly, which torch handles.
sys.modules.setdefault("triton", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

EXIT_GRACE_SECONDS = 300


def pytest_unconfigure(config):
    """Arms a watchdog as the session ends: if the process has not exited EXIT_GRACE_SECONDS later (a tf.data
    iterator's destructor waiting for a thread that waits for the GIL), it prints every thread's stack and exits
    with status 1, so CI fails with a trace instead of stalling."""
    faulthandler.dump_traceback_later(EXIT_GRACE_SECONDS, exit=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(image folder, workdir) of a finished tiny two-phase run that makes mistakes: what the tools after training
    (predict, evaluate, export, report) start from. Tests must not modify the workdir."""
    from tests import train_util

    root = tmp_path_factory.mktemp("trained")
    folder = train_util.image_folder(root / "images", per_class=40, overlap=40)
    workdir = root / "run"
    result = train_util.cli(folder, workdir, "--config.phases[0].epochs=1", "--config.phases[1].epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, workdir


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`): the
    tiny runs of one module compile the same steps again in each run and subprocess."""
    from tests import train_util

    with train_util.compile_cache(tmp_path_factory.mktemp("jax-cache")):
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small folder data set of generated images (`train_util.image_folder`), one per test module."""
    from tests import train_util

    return train_util.image_folder(tmp_path_factory.mktemp("images"))
