"""Test-wide settings: Keras on the JAX backend, exact float32 matmuls for parity checks, quiet TensorFlow."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
