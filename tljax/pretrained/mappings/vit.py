"""ViT weight tables: timm (augreg ViTs, DINOv2), torchvision (`vit_b_16`, ...) and Google's JAX `.npz` checkpoints.

The three name the same layers (see `models.vit`) differently; timm and torchvision compute query, key and value in
one projection, Google's checkpoints split them per head.

Position embeddings are resampled to the model's grid when the checkpoint's differs (a 224 px checkpoint built for
160 or 384 px), as timm resamples them when it builds a model at another image size: bicubic interpolation of the
square grid of patch embeddings, antialiased (PyTorch's `interpolate(mode="bicubic", antialias=True)`), with the
class (and register) tokens' embeddings left as they are. (big_vision interpolates bilinearly instead.)
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from tljax.models.vit import ViT
from tljax.pretrained.convert import Layer
from tljax.pretrained.mappings import Convention
from tljax.pretrained.prep import DINOV2, TORCHVISION, VIT_AUGREG, Preprocessing


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, which antialiased bicubic interpolation uses (PIL, PyTorch)."""
    a, x = -0.5, np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resample_matrix(size: int, new_size: int) -> np.ndarray:
    """(new_size, size) weights of antialiased bicubic interpolation along one axis (half-pixel centres, the kernel
    stretched by the scale when shrinking, taps past the edges dropped and the rest renormalised)."""
    scale = size / new_size
    stretch = max(scale, 1.0)
    weights = np.zeros((new_size, size))
    for i in range(new_size):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), size)
        taps = _cubic((np.arange(lo, hi) - centre + 0.5) / stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def resample_pos_embed(pos: np.ndarray, shape: tuple[int, ...], prefix: int) -> np.ndarray:
    """Position embeddings (1, prefix + n * n, width) -> `shape` (1, prefix + m * m, width): the first `prefix`
    (class / register tokens) as they are, the n x n grid resampled to m x m. Anything else is returned unchanged,
    for the conversion to report as a wrong shape."""
    n, m = (int(round(np.sqrt(length - prefix))) for length in (pos.shape[1], shape[1]))
    if n * n != pos.shape[1] - prefix or m * m != shape[1] - prefix or pos.shape[2] != shape[2]:
        return pos
    weights = resample_matrix(n, m)
    grid = pos[0, prefix:].reshape(n, n, -1).astype(np.float64)
    grid = np.einsum("ij,jkc,lk->ilc", weights, grid, weights).reshape(1, m * m, -1)
    return np.concatenate([pos[:, :prefix], grid.astype(pos.dtype)], axis=1)


def _pos_embed(source: str, backbone: ViT) -> Layer:
    """The position embeddings' layer, resampled to the model's grid; they cover the class and register tokens
    unless the model adds those without (`embed_prefix=False`)."""
    prefix = 1 + backbone.register_tokens if backbone.embed_prefix else 0
    resize = functools.partial(resample_pos_embed, prefix=prefix)
    return Layer(source, "backbone/embed/pos_embed", "param", resize=resize)


def timm(backbone: ViT) -> Iterator[Layer]:
    """timm `vit_*` state dicts (augreg ViTs; DINOv2 with `ls1/ls2.gamma` layer scales and `reg_token` registers)."""
    yield Layer("patch_embed.proj", "backbone/embed/patch", "conv")
    yield Layer("cls_token", "backbone/embed/cls_token", "param")
    if backbone.register_tokens:
        yield Layer("reg_token", "backbone/embed/reg_token", "param")
    yield _pos_embed("pos_embed", backbone)
    for i in range(backbone.depth):
        src, dst = f"blocks.{i}", f"backbone/block{i}"
        yield Layer(f"{src}.norm1", f"{dst}/norm1", "ln")
        yield Layer(f"{src}.attn.qkv", f"{dst}/attn", "qkv")
        yield Layer(f"{src}.attn.proj", f"{dst}/attn/out", "dense")
        if backbone.layer_scale:
            yield Layer(f"{src}.ls1.gamma", f"{dst}/ls1", "param")
        yield Layer(f"{src}.norm2", f"{dst}/norm2", "ln")
        yield Layer(f"{src}.mlp.fc1", f"{dst}/fc1", "dense")
        yield Layer(f"{src}.mlp.fc2", f"{dst}/fc2", "dense")
        if backbone.layer_scale:
            yield Layer(f"{src}.ls2.gamma", f"{dst}/ls2", "param")
    yield Layer("norm", "backbone/norm", "ln")
    yield Layer("head", "head/out", "dense")


def torchvision(backbone: ViT) -> Iterator[Layer]:
    """torchvision `vit_b_16`, `vit_b_32`, `vit_l_16` state dicts (nn.MultiheadAttention in every block)."""
    yield Layer("conv_proj", "backbone/embed/patch", "conv")
    yield Layer("class_token", "backbone/embed/cls_token", "param")
    yield _pos_embed("encoder.pos_embedding", backbone)
    for i in range(backbone.depth):
        src, dst = f"encoder.layers.encoder_layer_{i}", f"backbone/block{i}"
        yield Layer(f"{src}.ln_1", f"{dst}/norm1", "ln")
        yield Layer(f"{src}.self_attention", f"{dst}/attn", "mha")
        yield Layer(f"{src}.ln_2", f"{dst}/norm2", "ln")
        yield Layer(f"{src}.mlp.0", f"{dst}/fc1", "dense")
        yield Layer(f"{src}.mlp.3", f"{dst}/fc2", "dense")
    yield Layer("encoder.ln", "backbone/norm", "ln")
    yield Layer("heads.head", "head/out", "dense")


def vision_transformer(backbone: ViT) -> Iterator[Layer]:
    """Google's JAX checkpoints in google-research/vision_transformer's layout (the augreg `.npz` files, which
    big_vision loads too): `Transformer/encoderblock_{i}/...`, per-head query/key/value/out kernels."""
    yield Layer("embedding", "backbone/embed/patch", "conv")
    yield Layer("cls", "backbone/embed/cls_token", "param")
    yield _pos_embed("Transformer/posembed_input/pos_embedding", backbone)
    for i in range(backbone.depth):
        src, dst = f"Transformer/encoderblock_{i}", f"backbone/block{i}"
        yield Layer(f"{src}/LayerNorm_0", f"{dst}/norm1", "ln")
        yield Layer(f"{src}/MultiHeadDotProductAttention_1", f"{dst}/attn", "attention")
        yield Layer(f"{src}/LayerNorm_2", f"{dst}/norm2", "ln")
        yield Layer(f"{src}/MlpBlock_3/Dense_0", f"{dst}/fc1", "dense")
        yield Layer(f"{src}/MlpBlock_3/Dense_1", f"{dst}/fc2", "dense")
    yield Layer("Transformer/encoder_norm", "backbone/norm", "ln")
    yield Layer("head", "head/out", "dense")


def _timm_prep(arrays: dict[str, np.ndarray], backbone: ViT) -> Preprocessing:
    """DINOv2's convention for the models with layer scale (DINOv2's), otherwise the augreg ViTs'."""
    return DINOV2 if backbone.layer_scale else VIT_AUGREG


CONVENTIONS = (
    Convention("timm", "torch", r"^blocks\.0\.attn\.qkv\.weight$", timm, {}, _timm_prep),
    Convention("torchvision", "torch", r"^encoder\.layers\.encoder_layer_0\.self_attention\.in_proj_weight$",
               torchvision, {}, lambda arrays, backbone: TORCHVISION),
    Convention("vision_transformer", "flax", r"^Transformer/encoderblock_0/MultiHeadDotProductAttention_1/",
               vision_transformer, {}, lambda arrays, backbone: VIT_AUGREG),
)
