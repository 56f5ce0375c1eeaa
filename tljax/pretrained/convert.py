"""Source checkpoint arrays -> Flax variables, through a per-layer table, with exact bookkeeping.

A mapping table lists, for one architecture and one naming convention, every layer of the source checkpoint:
its name there, the Flax module it fills, and its kind. The kind fixes which tensors the layer holds and how each
is laid out (PyTorch OIHW convolution -> Flax HWIO, Linear (out, in) -> Dense (in, out), Keras depthwise HWC1 ->
HW1C, BatchNorm running statistics -> `batch_stats`, a fused query/key/value projection -> three Dense layers).
`convert` fills the model's variables from the table and refuses to half-load: missing tensors, tensors nothing
uses, and wrong shapes are all listed in one error.

Key forms: PyTorch state dicts are `module.path.tensor_name`; Keras weights are `layer_name/index`, the index being
the variable's position in the layer (Keras's own order: kernel, bias / gamma, beta, moving_mean, moving_variance),
and `sequential/layer_name/index` for a layer inside a nested Sequential; "flax" files (Google's JAX checkpoints,
`.npz`) are `module/path/leaf` with Flax's leaf names (kernel, bias, scale). Files written by `tljax.export` are
keyed by the Flax variables' own paths and need no table.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]
Resize = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
Slot = tuple[str, str, Transform | None, Resize | None]  # (source key, target variable path, layout change, resize)


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)


def _depthwise_keras(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (0, 1, 3, 2))


def _third(part: int, then: Transform | None = None) -> Transform:
    """The query (0), key (1) or value (2) part of a tensor that stacks the three on its first axis, then `then`."""
    def take(w: np.ndarray) -> np.ndarray:
        n = w.shape[0] // 3
        return w[part * n:(part + 1) * n] if then is None else then(w[part * n:(part + 1) * n])

    return take


def _merge_heads(w: np.ndarray) -> np.ndarray:
    """A Flax attention projection's (in, heads, head_dim) kernel / (heads, head_dim) bias -> (in, width) / (width,)."""
    return w.reshape(-1) if w.ndim == 2 else w.reshape(w.shape[0], -1)


def _merge_heads_out(w: np.ndarray) -> np.ndarray:
    """A Flax attention output's (heads, head_dim, out) kernel -> (width, out)."""
    return w.reshape(-1, w.shape[-1])


@dataclasses.dataclass(frozen=True)
class Layer:
    """One source layer: its name in the checkpoint, the Flax module path it fills, and its kind.

    kind: "conv", "dwconv" (Keras DepthwiseConv2D), "bn", "dense", "ln" (LayerNorm), "param" (one bare tensor, e.g.
    a class token; `target` is the variable's path; in Keras, a LayerScale layer's only variable), "qkv" (a PyTorch
    Linear computing query, key and value at once -> the target's `query`, `key`, `value` Dense layers), "mha"
    (PyTorch's nn.MultiheadAttention: its packed `in_proj` and `out_proj` -> `query`, `key`, `value`, `out`),
    "attention" (Flax's MultiHeadDotProductAttention, kernels split per head -> the same four), or "prep" (a Keras
    preprocessing layer whose weights describe the input normalisation, consumed by `Preprocessing`, not by the
    model).
    `transform` replaces the kind's layout change for the layer's weight/kernel (or its bare tensor): e.g. a
    flatten-order change.
    `resize` adapts a tensor to the model variable's shape when the file's differs (given both, after the layout
    change): a ViT's position embeddings resampled to the model's grid of patches.
    """

    source: str
    target: str
    kind: str
    transform: Transform | None = None
    resize: Resize | None = None


def _stacked_qkv(weight: str, bias: str) -> tuple[tuple[str, str, str, Transform], ...]:
    """A PyTorch weight and bias stacking query, key and value on their first axis -> the three Dense layers."""
    return tuple(entry for part, name in enumerate(("query", "key", "value")) for entry in (
        (weight, "params", f"{name}/kernel", _third(part, _transpose)), (bias, "params", f"{name}/bias", _third(part))))


# (tensor name, collection, Flax leaf, layout change) per kind.
_TORCH_TENSORS: dict[str, tuple[tuple[str, str, str, Transform | None], ...]] = {
    "conv": (("weight", "params", "kernel", _oihw_to_hwio), ("bias", "params", "bias", None)),
    "dense": (("weight", "params", "kernel", _transpose), ("bias", "params", "bias", None)),
    "ln": (("weight", "params", "scale", None), ("bias", "params", "bias", None)),
    "qkv": _stacked_qkv("weight", "bias"),
    "mha": (*_stacked_qkv("in_proj_weight", "in_proj_bias"),
            ("out_proj.weight", "params", "out/kernel", _transpose), ("out_proj.bias", "params", "out/bias", None)),
    "bn": (
        ("weight", "params", "scale", None),
        ("bias", "params", "bias", None),
        ("running_mean", "batch_stats", "mean", None),
        ("running_var", "batch_stats", "var", None),
    ),
    "prep": (),
}
# (collection, Flax leaf, layout change) per variable index, per kind.
_KERAS_VARS: dict[str, tuple[tuple[str, str, Transform | None], ...]] = {
    "conv": (("params", "kernel", None), ("params", "bias", None)),
    "dwconv": (("params", "kernel", _depthwise_keras), ("params", "bias", None)),
    "dense": (("params", "kernel", None), ("params", "bias", None)),
    "bn": (
        ("params", "scale", None),
        ("params", "bias", None),
        ("batch_stats", "mean", None),
        ("batch_stats", "var", None),
    ),
    "ln": (("params", "scale", None), ("params", "bias", None)),
    "prep": (),
}
# (leaf name in the file, collection, Flax leaf, layout change) per kind, for "flax" files.
_FLAX_TENSORS: dict[str, tuple[tuple[str, str, str, Transform | None], ...]] = {
    "conv": (("kernel", "params", "kernel", None), ("bias", "params", "bias", None)),
    "dense": (("kernel", "params", "kernel", None), ("bias", "params", "bias", None)),
    "ln": (("scale", "params", "scale", None), ("bias", "params", "bias", None)),
    "attention": (*((f"{name}/{leaf}", "params", f"{name}/{leaf}", _merge_heads)
                    for name in ("query", "key", "value") for leaf in ("kernel", "bias")),
                  ("out/kernel", "params", "out/kernel", _merge_heads_out), ("out/bias", "params", "out/bias", None)),
}
# The Keras class (snake case) of each kind: Keras 3 `.weights.h5` files name layers by class and ordinal; a Keras
# layer holding one bare variable is ConvNeXt's LayerScale.
KERAS_CLASS = {
    "conv": "conv2d",
    "dwconv": "depthwise_conv2d",
    "dense": "dense",
    "bn": "batch_normalization",
    "ln": "layer_normalization",
    "param": "layer_scale",
    "prep": "normalization",
}
_TORCH_IGNORED = ("num_batches_tracked",)


class WeightsMismatchError(ValueError):
    """The checkpoint does not fit the model: lists what is missing, unexpected and wrong-shaped."""


def _slots(layer: Layer, fmt: str) -> Iterable[tuple[str, str, str, Transform | None]]:
    """(source key, collection, leaf, transform) for each tensor a layer of this kind can hold ("" for a bare
    tensor's leaf: the target is the variable itself)."""
    if layer.kind == "param":
        yield (f"{layer.source}/0" if fmt == "keras" else layer.source), "params", "", None
    elif fmt == "torch":
        for name, collection, leaf, fn in _TORCH_TENSORS[layer.kind]:
            yield f"{layer.source}.{name}", collection, leaf, fn
    elif fmt == "flax":
        for name, collection, leaf, fn in _FLAX_TENSORS[layer.kind]:
            yield f"{layer.source}/{name}", collection, leaf, fn
    else:
        for i, (collection, leaf, fn) in enumerate(_KERAS_VARS[layer.kind]):
            yield f"{layer.source}/{i}", collection, leaf, fn


def keras3_names(layers: Iterable[Layer]) -> dict[str, str]:
    """Keras 3 layer names (`conv2d_5`) -> Keras layer names (`conv2_block1_1_conv`), by class ordinal.

    Keras 3 saves a functional model's layers under their class name numbered in `model.layers` order, so the
    table's order (which follows the Keras model) recovers the real names. A nested Sequential (a table source
    `sequential_name/layer_name`) is one `sequential` of that numbering, and numbers its own layers afresh:
    `sequential_1/conv2d` -> `convnext_tiny_downsampling_block_0/convnext_tiny_downsampling_conv_0`.
    """
    def numbered(counts: dict[str, int], cls: str) -> str:
        n = counts.get(cls, 0)
        counts[cls] = n + 1
        return cls if n == 0 else f"{cls}_{n}"

    counts: dict[str, int] = {}
    nested: dict[str, tuple[str, dict[str, int]]] = {}  # Sequential name -> (its Keras 3 name, its own counts)
    names = {}
    for layer in layers:
        group, _, inner = layer.source.rpartition("/")
        if not group:
            names[numbered(counts, KERAS_CLASS[layer.kind])] = layer.source
            continue
        if group not in nested:
            nested[group] = (numbered(counts, "sequential"), {})
        renamed, inner_counts = nested[group]
        names[f"{renamed}/{numbered(inner_counts, KERAS_CLASS[layer.kind])}"] = layer.source
    return names


def _listing(title: str, items: list[str], limit: int = 25) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def _in_head(target: str) -> bool:
    """Whether a variable path (`params/head/out/kernel`) belongs to the classifier."""
    return target.split("/")[1] == "head"


def _table_slots(layers: Iterable[Layer], fmt: str, arrays: dict[str, np.ndarray]) -> tuple[list[Slot], set[str]]:
    """A table's slots, and the keys of its "prep" layers (read by `Preprocessing`, not by the model)."""
    slots, prep_keys = [], set()
    for layer in layers:
        for key, collection, leaf, fn in _slots(layer, fmt):
            if layer.transform is not None and leaf in ("kernel", ""):
                fn = layer.transform
            slots.append((key, "/".join(filter(None, (collection, layer.target, leaf))), fn, layer.resize))
        if layer.kind == "prep":
            prep_keys.update(k for k in arrays if k.startswith(f"{layer.source}/"))
    return slots, prep_keys


def convert(
    arrays: dict[str, np.ndarray],
    layers: Iterable[Layer],
    abstract: dict,
    fmt: str,
    drop_head: bool,
    what: str = "weights",
) -> dict:
    """Fills `abstract` (a variables tree of ShapeDtypeStructs) from `arrays` via the table `layers`.

    fmt: "torch", "keras" or "flax" (key forms above), or "tljax": a tljax export, whose keys are the variables' own
    paths (`params/backbone/stem_conv/kernel`), so no table is needed (`layers` is empty). With `drop_head`, the
    checkpoint's classifier (targets under `head/`) is read past and the returned tree has no head: the caller
    initialises a new one.
    Raises WeightsMismatchError listing every missing, unexpected and wrong-shaped tensor.
    """
    expected = traverse_util.flatten_dict(abstract, sep="/")
    if fmt == "tljax":
        slots, used = [(key, key, None, None) for key in sorted(set(arrays) | set(expected))], set()
    else:
        slots, used = _table_slots(layers, fmt, arrays)  # the keys of "prep" layers count as used
    filled: dict[str, np.ndarray] = {}
    accounted: set[str] = set()  # model variables some slot is responsible for
    missing, wrong = [], []
    for key, target, fn, resize in slots:
        if drop_head and _in_head(target):
            used.add(key)
            continue
        if target not in expected:
            continue  # a tensor the model has no place for stays unused and is reported below
        accounted.add(target)
        if key not in arrays:
            missing.append(key if key == target else f"{key} (-> {target})")
            continue
        used.add(key)
        value = (fn or np.asarray)(arrays[key])
        if value.shape != expected[target].shape and resize is not None:
            value = resize(value, expected[target].shape)
        if value.shape != expected[target].shape:
            wrong.append(f"{key}: {arrays[key].shape} in the file, {target} is {expected[target].shape}")
            continue
        filled[target] = np.asarray(value, dtype=expected[target].dtype)

    unexpected = sorted(k for k in arrays if k not in used and not k.endswith(_TORCH_IGNORED))
    uncovered = sorted(t for t in expected if t not in accounted and not (drop_head and _in_head(t)))
    if missing or unexpected or wrong or uncovered:
        parts = [f"{what} do not fit the model:"]
        if missing:
            parts.append(_listing("missing from the file", missing))
        if unexpected:
            parts.append(_listing("in the file but unused by the model", unexpected))
        if wrong:
            parts.append(_listing("wrong shape", wrong))
        if uncovered:
            parts.append(_listing("model variables no table entry fills", uncovered))
        raise WeightsMismatchError("\n".join(parts))
    return traverse_util.unflatten_dict(filled, sep="/")
