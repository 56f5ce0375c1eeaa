"""tljax: transfer learning on images with JAX/Flax.

Subpackages: `models` (Flax backbones + classification heads), `pretrained` (weights from PyTorch and Keras files),
`data` (tf.data input pipelines with normalization), and the training entry point `tljax.main`.
"""

__version__ = "0.1.0"
