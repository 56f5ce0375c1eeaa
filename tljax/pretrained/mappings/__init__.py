"""Naming conventions of pretrained weights, one table per (model family, convention).

A `Convention` says how to recognise a checkpoint (a key only its files hold), how to build the backbone for it
(e.g. the Keras ResNet layout), which source layer fills which Flax module, and what input the weights expect.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping

import flax.linen as nn
import numpy as np

from tljax import models
from tljax.pretrained.convert import Layer, WeightsMismatchError
from tljax.pretrained.prep import Preprocessing


@dataclasses.dataclass(frozen=True)
class Convention:
    """One way a family's weights are named and laid out.

    format: "torch" (`module.tensor` keys), "keras" (`layer/index` keys) or "flax" (`module/leaf` keys, `.npz`).
    signature: a regular expression that some key of every such file matches and no other convention's files do;
        None for a convention whose files cannot be told apart by their keys (chosen by name only).
    layers: the table for a given backbone, in the source model's layer order.
    backbone_kwargs: how to build the backbone these weights belong to (e.g. `{"style": "keras"}`).
    prep: the input the weights expect, given the file's arrays and the backbone (its native resolution, and for
        Keras EfficientNet the normalisation stored in the file).
    classifier_kwargs: backbone kwargs added when the checkpoint's classifier is kept (`num_classes=None`), e.g.
        VGG's `{"fc": True}`: the classifier's hidden layers then sit in the backbone, before the kept head.
    """

    name: str
    format: str
    signature: str | None
    layers: Callable[[nn.Module], Iterator[Layer]]
    backbone_kwargs: Mapping
    prep: Callable[[dict[str, np.ndarray], nn.Module], Preprocessing]
    classifier_kwargs: Mapping = dataclasses.field(default_factory=dict)

    def matches(self, keys: list[str]) -> bool:
        if self.signature is None:
            return False
        pattern = re.compile(self.signature)
        return any(pattern.search(k) for k in keys)


def _family_conventions(family: str) -> tuple[Convention, ...]:
    from tljax.pretrained.mappings import convnext, efficientnet, resnet, vgg, vit

    return {"resnet": resnet, "efficientnet": efficientnet, "vgg": vgg, "vit": vit,
            "convnext": convnext}[family].CONVENTIONS


def conventions(family: str) -> dict[str, Convention]:
    """A family's conventions by name."""
    return {c.name: c for c in _family_conventions(family)}


def detect(family: str, keys: list[str], fmt: str, name: str | None = None) -> Convention:
    """The convention of a checkpoint: `name` when given, else the one whose signature the keys match.

    Raises ValueError for an unknown `name`, and WeightsMismatchError (naming the family the keys do belong to, if
    any) for keys that match none of the family's conventions: a checkpoint of another architecture.
    """
    known = conventions(family)
    if name is not None:
        if name not in known:
            raise ValueError(f"unknown {family} weight convention {name!r}; known: {', '.join(known)}")
        return known[name]
    found = [c for c in known.values() if c.format == fmt and c.matches(keys)]
    if not found:
        others = [f"{other} ({c.name})" for other in models.FAMILIES if other != family
                  for c in _family_conventions(other) if c.format == fmt and c.matches(keys)]
        sample = ", ".join(sorted(keys)[:8])
        what = f"they are {others[0]} weights." if others else "nor another family's (another architecture?)."
        raise WeightsMismatchError(f"these weights match no {family} naming convention ({', '.join(known)}); {what} "
                                   f"The file holds {len(keys)} tensors, e.g. {sample}")
    return found[0]
