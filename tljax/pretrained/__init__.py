"""Pretrained weights from PyTorch and Keras files, loaded into tljax models with exact parity.

    model, variables, prep = pretrained.load("resnet50", "resnet50.safetensors", num_classes=10)
    logits = model.apply(variables, prep.normalize(images), train=False)   # images: NHWC RGB 0..255

`source` is a local file (`.safetensors`, `.pth`/`.pt`, Keras `.h5` / `.weights.h5`, Google's JAX `.npz`, or a
model exported by `python -m tljax.export`) or a known weight name (`hub.KNOWN`, e.g.
"torchvision/resnet50.IMAGENET1K_V2"), downloaded once into a checksummed cache.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import models
from tljax.models import Classifier
from tljax.pretrained import exported, hub, mappings, readers
from tljax.pretrained.convert import Layer, WeightsMismatchError, convert, keras3_names
from tljax.pretrained.prep import Preprocessing
from tljax.pretrained.hub import WeightsUnavailableError
from tljax.pretrained.readers import WeightsFileError


def _num_classes_in_file(arrays: dict[str, np.ndarray], layers: list[Layer], fmt: str) -> int:
    if fmt == "tljax":
        key, axis = "params/head/out/kernel", -1
    else:
        source = next(layer.source for layer in layers if layer.target == "head/out")
        key, axis = {"torch": (f"{source}.weight", 0), "flax": (f"{source}/kernel", -1)}.get(fmt, (f"{source}/0", -1))
    if key not in arrays:
        raise WeightsMismatchError(
            f"the weights hold no classifier ({key} is absent: a feature-extractor / 'notop' file?); "
            "pass num_classes=N to put a new head on the backbone"
        )
    return int(arrays[key].shape[axis])


@dataclasses.dataclass
class Weights:
    """A weights file read and matched to a model family: what it holds and the input it expects.

    `read` does the I/O and naming-convention detection once; `build` makes a model from it, either keeping the
    file's classifier or with a new head (the training loop needs `prep` before it knows the number of classes).
    """

    name: str
    path: str
    arrays: dict[str, np.ndarray]
    format: str  # "torch", "keras", "flax" or "tljax" (an export: keys are variable paths): the key form of `arrays`
    convention: mappings.Convention  # for an export, `exported.convention`: the file's own model
    create_kwargs: dict[str, Any]
    prep: Preprocessing

    def build(self, num_classes: int | None = None, seed: int = 0,
              image_size: int | None = None) -> tuple[Classifier, dict]:
        """(model, variables): the file's classifier when num_classes is None, else a new head seeded by `seed`.

        image_size: the input size to build for (default: `prep.image_size`, the weights' own); a ViT's position
        embeddings are resampled to its grid of patches.
        """
        keep_head = num_classes is None
        kwargs = {**self.create_kwargs, **(self.convention.classifier_kwargs if keep_head else {})}
        probe = models.create(self.name, 1, **kwargs)
        layers = list(self.convention.layers(probe.backbone))
        classes = _num_classes_in_file(self.arrays, layers, self.format) if keep_head else num_classes
        model = models.create(self.name, classes, **kwargs)

        rng = jax.random.key(seed)
        size = image_size or self.prep.image_size
        image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        abstract = jax.eval_shape(functools.partial(model.init, train=False), {"params": rng, "dropout": rng}, image)
        variables = convert(self.arrays, layers, abstract, self.format, not keep_head, f"weights in {self.path}")
        if not keep_head:
            features = jax.eval_shape(functools.partial(model.apply, method="features"), abstract, image)
            head = model.head.init(rng, jnp.zeros(features.shape, features.dtype))
            variables["params"]["head"] = head["params"]
        return model, jax.tree.map(jnp.asarray, variables)


def _keras3_to_keras(arrays: dict[str, np.ndarray], family: str, name: str, create_kwargs: dict, path) -> dict:
    """Keras 3 names layers by class ordinal; the family's Keras table (in Keras's layer order) recovers names."""
    keras = [c for c in mappings.conventions(family).values() if c.format == "keras"][0]
    probe = models.create(name, 1, **{**create_kwargs, **keras.backbone_kwargs})
    renamed = keras3_names(keras.layers(probe.backbone))
    unknown = sorted(k for k in arrays if k.rpartition("/")[0] not in renamed)
    if unknown:
        raise WeightsMismatchError(
            f"{path}: Keras 3 layers with no counterpart in Keras's {name}: {', '.join(unknown[:20])}")
    return {f"{renamed[k.rpartition('/')[0]]}/{k.rpartition('/')[2]}": v for k, v in arrays.items()}


def read(name: str, source: str | os.PathLike, *, convention: str | None = None, **create_kwargs: Any) -> Weights:
    """Reads `source` (a file or a known weight name) for model `name` and detects its naming convention."""
    family = models.family(name)
    path, known = hub.resolve(source, name)
    arrays, fmt = readers.read(path)
    if fmt == "keras":  # Keras numbers unnamed layers per session: "normalization_1" after a first model was built
        arrays = {re.sub(r"^normalization_\d+/", "normalization/", k): v for k, v in arrays.items()}
    if fmt == "keras3":
        arrays, fmt = _keras3_to_keras(arrays, family, name, create_kwargs, path), "keras"
    if fmt == "tljax":
        conv = exported.convention(name, path, convention)
    else:
        conv = mappings.detect(family, list(arrays), fmt, convention or (known.convention if known else None))
    kwargs = {**create_kwargs, **conv.backbone_kwargs}
    if known is not None and known.prep is not None:
        prep = known.prep
    else:
        prep = conv.prep(arrays, models.create(name, 1, **kwargs).backbone)
    return Weights(name, str(path), arrays, fmt, conv, kwargs, prep)


def load(
    name: str,
    source: str | os.PathLike,
    num_classes: int | None = None,
    *,
    convention: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    **create_kwargs: Any,
) -> tuple[Classifier, dict, Preprocessing]:
    """Builds model `name` and fills it with the weights in `source`.

    num_classes: None keeps the checkpoint's classifier (for a tljax export: the exported model exactly); an int
    puts a freshly initialised head of that size, built from `create_kwargs`, on the pretrained backbone (seeded by
    `seed`).
    image_size: the input size the model is built for (default: the weights' own, `prep.image_size`); a ViT's
    position embeddings are resampled to its grid of patches (bicubic, as timm does).
    convention: the naming convention (e.g. "torchvision", "timm", "lukemelas", "keras"); detected from the keys
    when None.
    create_kwargs: passed to `models.create` (head_hidden, head_activation, head_dropout, dtype).
    Returns (model, variables, prep): variables = {"params", "batch_stats"}; prep = the input the weights expect.
    """
    weights = read(name, source, convention=convention, **create_kwargs)
    model, variables = weights.build(num_classes, seed, image_size)
    return model, variables, weights.prep


__all__ = [
    "Preprocessing", "Weights", "WeightsFileError", "WeightsMismatchError", "WeightsUnavailableError", "load", "read",
]
