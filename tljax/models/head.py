"""The classification head and the backbone + head composition every tljax model is.

A model's parameters are `{"backbone": ..., "head": ...}`, so that freezing the backbone, replacing the head, or
caching the backbone's features are all statements about one top-level key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.layers import at_least_f32

ACTIVATIONS = {"relu": nn.relu, "elu": nn.elu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid, "gelu": nn.gelu}


class Head(nn.Module):
    """Pooled features -> logits: [dropout -> dense -> activation] per hidden width, then dropout -> dense.

    This is the Keras transfer-learning guide's head (pool, dropout, dense), optionally with hidden layers.
    Logits are float32 whatever the compute dtype.
    """

    num_classes: int
    hidden: Sequence[int] = ()
    activation: str = "relu"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown head activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        x = features
        for i, width in enumerate(self.hidden):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = ACTIVATIONS[self.activation](nn.Dense(width, dtype=self.dtype, name=f"hidden{i}")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return at_least_f32(nn.Dense(self.num_classes, dtype=self.dtype, name="out")(x))


class Classifier(nn.Module):
    """A backbone (images -> pooled features) followed by a `Head` (features -> logits).

    `train` switches the head's dropout; `backbone_train` (default: `train`) switches the backbone between training
    mode (BatchNorm on batch statistics and updating them, stochastic depth) and inference mode. Keeping the
    backbone in inference mode while the head trains is the Keras guide's advice for fine-tuning. `training_only`
    narrows BatchNorm's training mode to the layers whose parameters train.
    """

    backbone: nn.Module
    head: Head

    def __call__(self, images: jax.Array, train: bool = False, backbone_train: bool | None = None) -> jax.Array:
        return self.classify(self.features(images, train if backbone_train is None else backbone_train), train)

    def training_only(self, trained_modules: frozenset[str]) -> Classifier:
        """This classifier with BatchNorm in training mode only in `trained_modules`, the paths of the modules whose
        parameters train ("backbone/stage4_block0/bn1"); every other BatchNorm layer runs in inference mode, also
        under `backbone_train=True` (Keras's rule, see `layers.BatchNorm`). Stochastic depth still follows
        `backbone_train`. Variables and their names do not change. A backbone without BatchNorm (VGG) is kept as is.
        """
        if "trained_modules" not in {f.name for f in dataclasses.fields(self.backbone)}:
            return self
        return self.clone(backbone=self.backbone.clone(trained_modules=frozenset(trained_modules)))

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images (NHWC, normalised as the weights expect) -> pooled backbone features (N, D), float32."""
        return self.backbone(images, train=train)

    def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
        """Pooled features -> logits."""
        return self.head(features, train=train)
