"""Pretrained weights from PyTorch and Keras files, loaded into tljax models with exact parity.

    model, variables, prep = pretrained.load("resnet50", "resnet50.safetensors", num_classes=10)
    logits = model.apply(variables, prep.normalize(images), train=False)   # images: NHWC RGB 0..255

`source` is a local file (`.safetensors`, `.pth`/`.pt`, Keras `.h5` / `.weights.h5`) or a known weight name
(`hub.KNOWN`, e.g. "torchvision/resnet50.IMAGENET1K_V2"), downloaded once into a checksummed cache.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import models
from tljax.models import Classifier
from tljax.pretrained import hub, mappings, readers
from tljax.pretrained.convert import Layer, WeightsMismatchError, convert, keras3_names
from tljax.pretrained.prep import Preprocessing
from tljax.pretrained.readers import WeightsFileError


def _num_classes_in_file(arrays: dict[str, np.ndarray], layers: list[Layer], fmt: str) -> int:
    out = [layer for layer in layers if layer.target == "head/out"]
    key = f"{out[0].source}.weight" if fmt == "torch" else f"{out[0].source}/0"
    if key not in arrays:
        raise WeightsMismatchError(
            f"the weights hold no classifier ({key} is absent: a feature-extractor / 'notop' file?); "
            "pass num_classes=N to put a new head on the backbone"
        )
    return int(arrays[key].shape[0] if fmt == "torch" else arrays[key].shape[-1])


def load(
    name: str,
    source: str | os.PathLike,
    num_classes: int | None = None,
    *,
    convention: str | None = None,
    seed: int = 0,
    **create_kwargs: Any,
) -> tuple[Classifier, dict, Preprocessing]:
    """Builds model `name` and fills it with the weights in `source`.

    num_classes: None keeps the checkpoint's classifier; an int puts a freshly initialised head of that size on
    the pretrained backbone (seeded by `seed`).
    convention: the naming convention (e.g. "torchvision", "timm", "lukemelas", "keras"); detected from the keys
    when None.
    create_kwargs: passed to `models.create` (head_hidden, head_activation, head_dropout, dtype).
    Returns (model, variables, prep): variables = {"params", "batch_stats"}; prep = the input the weights expect.
    """
    family = models.family(name)
    path, known = hub.resolve(source, name)
    arrays, fmt = readers.read(path)
    table_format = "keras" if fmt == "keras3" else fmt
    if known is not None:
        convention = convention or known.convention
    if fmt == "keras3":
        # Keras 3 names layers by class ordinal; any convention's table recovers the names (same model order).
        keras = [c for c in mappings.conventions(family).values() if c.format == "keras"]
        probe = models.create(name, 1, **{**create_kwargs, **keras[0].backbone_kwargs})
        renamed = keras3_names(keras[0].layers(probe.backbone))
        unknown = sorted(k for k in arrays if k.split("/")[0] not in renamed)
        if unknown:
            raise WeightsMismatchError(
                f"{path}: Keras 3 layers with no counterpart in Keras's {name}: {', '.join(unknown[:20])}"
            )
        arrays = {f"{renamed[k.split('/')[0]]}/{k.split('/')[1]}": v for k, v in arrays.items()}
    conv = mappings.detect(family, list(arrays), table_format, convention)

    kwargs = {**create_kwargs, **conv.backbone_kwargs}
    probe = models.create(name, 1, **kwargs)
    layers = list(conv.layers(probe.backbone))
    keep_head = num_classes is None
    classes = _num_classes_in_file(arrays, layers, table_format) if keep_head else num_classes
    model = models.create(name, classes, **kwargs)
    prep = known.prep if known is not None and known.prep is not None else conv.prep(arrays, model.backbone)

    rng = jax.random.key(seed)
    image = jax.ShapeDtypeStruct((1, prep.image_size, prep.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), {"params": rng, "dropout": rng}, image)
    variables = convert(arrays, layers, abstract, table_format, drop_head=not keep_head, what=f"weights in {path}")
    if not keep_head:
        features = jax.eval_shape(functools.partial(model.apply, method="features"), abstract, image)
        head = model.head.init(rng, jnp.zeros(features.shape, features.dtype))
        variables["params"]["head"] = head["params"]
    return model, jax.tree.map(jnp.asarray, variables), prep


__all__ = ["Preprocessing", "WeightsFileError", "WeightsMismatchError", "load"]
