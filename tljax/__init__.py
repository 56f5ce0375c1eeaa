"""tljax: transfer learning on images with JAX/Flax.

The commands are the top-level modules (`python -m tljax.main`, `predict`, `evaluate`, `export`, `report`, `sweep`,
`probe`) and `config` (every config field). The library they call: `models` (Flax backbones and classification
heads), `pretrained` (weights from PyTorch, Keras and JAX files), `data` (tf.data input pipelines with
normalization), `training` (phases, steps, optimizers, checkpoints), `runs` (a trained workdir read back),
`reporting` (plots and pages) and `research` (sweeps and the few-shot probe).
"""

__version__ = "0.1.0"
