"""Vision Transformer backbones: ViT-Ti/S/B/L (Google's augreg weights, timm, torchvision) and DINOv2 ViT-S/B/L.

A pre-norm transformer encoder over non-overlapping patches, in the layout that timm, torchvision and Google's JAX
checkpoints share:

    embed: patch (p x p convolution, stride p) -> [cls_token, reg_token x R, patch tokens] + pos_embed
    block{i}, i < depth: x + [ls1 *] attn(norm1(x)), then x + [ls2 *] fc2(gelu(fc1(norm2(x))))
    norm, then pooling: the class token ("token") or the mean of the patch tokens ("avg")

The pooled vector, before any classifier (the pre-logits representation), is the backbone's features. DINOv2 adds
layer scale (`ls1`, `ls2`: a learnt per-channel scale of each residual branch) and, in the `_reg4_` variants, four
register tokens; there neither the class token nor the registers take a position embedding (`embed_prefix=False`).

`pos_embed` holds one embedding per patch of the grid the model was initialised (or loaded) for; an input with
another grid is refused, and `pretrained.load(..., image_size=...)` resamples a checkpoint's embeddings to the grid
of another image size. The patch size must divide the image size.

Precision: `dtype` is the compute dtype of the convolution and the matrix products; the residual stream, the
LayerNorms and the attention softmax run in float32 (float64 for float64 inputs); parameters are float32. Attention
holds at most one (tokens x tokens) matrix per head at a time (see `attention`).
Parameter names: `embed` (`patch`, `cls_token`, `reg_token`, `pos_embed`), `block{i}` (`norm1`, `attn` with `query`,
`key`, `value`, `out`, `ls1`, `norm2`, `fc1`, `fc2`, `ls2`), `norm`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.layers import Conv, Dense, at_least_f32, drop_path, layer_norm

EPS = 1e-6  # LayerNorm epsilon of timm's, torchvision's and Google's ViTs
LAYER_SCALE_INIT = 1e-5  # DINOv2's
POOLS = ("token", "avg")
QUERY_BLOCK = 256  # the most queries attention computes at once


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v with the softmax in float32 or wider: `jax.nn.dot_product_attention`, except
    in float64, which it computes in float32 (1e-7 errors): there the same as an explicit einsum and softmax."""
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head attention of (batch, tokens, heads, head_dim) queries, keys and values.

    The queries go through in blocks of at most half the tokens (and at most `QUERY_BLOCK`), one block after the
    other (`lax.map`): the logits and the probabilities of one block, all that exists of them at any time, make at
    most one (tokens x tokens) matrix per head, instead of two for the whole sequence at once.
    """
    b, t, h, d = q.shape
    blocks = max(2, -(-t // QUERY_BLOCK))
    size = -(-t // blocks)
    padded = jnp.pad(q, ((0, 0), (0, blocks * size - t), (0, 0), (0, 0)))
    out = jax.lax.map(lambda block: _attend(block, k, v), padded.reshape(b, blocks, size, h, d).swapaxes(0, 1))
    return out.swapaxes(0, 1).reshape(b, blocks * size, h, d)[:, :t]


class Attention(nn.Module):
    """Multi-head self-attention: `query`, `key`, `value` and `out` projections (each width x width, with bias)."""

    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"{self.name}: width {width} is not divisible by {self.num_heads} heads")
        heads = (b, t, self.num_heads, width // self.num_heads)
        q, k, v = (Dense(width, dtype=self.dtype, name=name)(x).reshape(heads) for name in ("query", "key", "value"))
        return Dense(width, dtype=self.dtype, name="out")(attention(q, k, v).reshape(b, t, width))


class Block(nn.Module):
    """A pre-norm transformer block; its two residual branches are dropped together per example with probability
    `drop_rate` in training mode (stochastic depth)."""

    num_heads: int
    mlp_ratio: float
    layer_scale: bool
    drop_rate: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = x.shape[-1]

        def branch(y: jax.Array, scale: str) -> jax.Array:
            if self.layer_scale:
                y = y * self.param(scale, nn.initializers.constant(LAYER_SCALE_INIT), (width,), jnp.float32)
            return drop_path(self, y, self.drop_rate, train)

        x = x + branch(Attention(self.num_heads, self.dtype, name="attn")(layer_norm(EPS, "norm1")(x)), "ls1")
        y = Dense(int(width * self.mlp_ratio), dtype=self.dtype, name="fc1")(layer_norm(EPS, "norm2")(x))
        y = Dense(width, dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
        return x + branch(y, "ls2")


class Embedding(nn.Module):
    """Images -> tokens: patches projected to `width`, behind the class token and `register_tokens` registers, plus
    the position embeddings (of the patches, and of the class and register tokens when `embed_prefix`)."""

    patch_size: int
    width: int
    register_tokens: int
    embed_prefix: bool
    dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        n, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"a ViT with {p}x{p} patches needs an image size that {p} divides, not {h}x{w}")
        x = Conv(self.width, p, strides=p, use_bias=True, dtype=self.dtype, name="patch")(images)
        x = at_least_f32(x).reshape(n, -1, self.width)
        prefix = 1 + self.register_tokens
        positions = x.shape[1] + (prefix if self.embed_prefix else 0)
        if self.has_variable("params", "pos_embed"):
            held = self.get_variable("params", "pos_embed").shape[1] - (prefix if self.embed_prefix else 0)
            if held != x.shape[1]:
                raise ValueError(
                    f"pos_embed holds {held} patch positions, but {h}x{w} images have {x.shape[1]} patches: build "
                    f"the model for this image size (pretrained.load(..., image_size={h}) resamples a checkpoint's "
                    "position embeddings)")
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, positions, self.width), jnp.float32)
        tokens = [self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), jnp.float32)]
        if self.register_tokens:
            tokens.append(self.param("reg_token", nn.initializers.zeros, (1, self.register_tokens, self.width),
                                     jnp.float32))
        tokens = jnp.broadcast_to(jnp.concatenate(tokens, axis=1), (n, prefix, self.width)).astype(x.dtype)
        if self.embed_prefix:
            return jnp.concatenate([tokens, x], axis=1) + pos
        return jnp.concatenate([tokens, x + pos], axis=1)


class ViT(nn.Module):
    """Images (NHWC) -> the pooled, normalised representation (width features), float32 or wider.

    pool: "token" (the class token, as the classifiers of these checkpoints read it) or "avg" (the mean of the
    normalised patch tokens: timm's global_pool="avg" without fc_norm). drop_path_rate: stochastic depth of the last
    block, growing linearly from 0 at the first (training mode only). native_size: the resolution the pretrained
    weights were trained at; it does not change the computation.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    layer_scale: bool = False
    register_tokens: int = 0
    embed_prefix: bool = True
    pool: str = "token"
    drop_path_rate: float = 0.0
    native_size: int = 224
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f"unknown ViT pool {self.pool!r}; choose one of {POOLS}")
        x = Embedding(self.patch_size, self.width, self.register_tokens, self.embed_prefix, self.dtype,
                      name="embed")(x)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            block = Block(self.num_heads, self.mlp_ratio, self.layer_scale, float(rates[i]), self.dtype,
                          name=f"block{i}")
            x = block(x, train)
        norm = layer_norm(EPS, "norm")
        if self.pool == "token":
            return norm(x[:, 0])  # LayerNorm acts per token: only the class token's is needed
        return jnp.mean(norm(x[:, 1 + self.register_tokens:]), axis=1)

    def depth_order(self) -> list[tuple[str, ...]]:
        """The top-level modules by depth, for layer-wise learning-rate decay (`models.layer_depths`), as BEiT and
        MAE assign them: the embedding (patches, tokens, position embeddings) at 0, block i at i + 1, and the final
        LayerNorm at the top depth, which the head shares."""
        return [("embed",), *[(f"block{i}",) for i in range(self.depth)], ("norm",)]

    def unfreeze_stages(self) -> list[str]:
        """One regular expression over the top-level module names per block, from the embedding up, for gradual
        unfreezing (`config.unfreeze_schedule`): block0 (with the embedding) to the last block (with `norm`)."""
        blocks = [f"block{i}" for i in range(self.depth)]
        return [f"embed|{blocks[0]}", *blocks[1:-1], f"{blocks[-1]}|norm"]


def _vit(patch: int, width: int, depth: int, heads: int, **kwargs: Any) -> Callable[..., ViT]:
    return functools.partial(ViT, patch_size=patch, width=width, depth=depth, num_heads=heads, **kwargs)


# DINOv2 was trained at 518 px (a 37 x 37 grid of 14 px patches) with layer scale.
_DINOV2 = {"layer_scale": True, "native_size": 518}
_REG4 = {"register_tokens": 4, "embed_prefix": False}

# (patch size, width, depth, heads) from the ViT and DINOv2 papers / timm.
PRESETS = {
    "vit_tiny_patch16": _vit(16, 192, 12, 3),
    "vit_small_patch16": _vit(16, 384, 12, 6),
    "vit_base_patch16": _vit(16, 768, 12, 12),
    "vit_base_patch32": _vit(32, 768, 12, 12),
    "vit_large_patch16": _vit(16, 1024, 24, 16),
    "vit_small_patch14_dinov2": _vit(14, 384, 12, 6, **_DINOV2),
    "vit_base_patch14_dinov2": _vit(14, 768, 12, 12, **_DINOV2),
    "vit_large_patch14_dinov2": _vit(14, 1024, 24, 16, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": _vit(14, 384, 12, 6, **_DINOV2, **_REG4),
    "vit_base_patch14_reg4_dinov2": _vit(14, 768, 12, 12, **_DINOV2, **_REG4),
    "vit_large_patch14_reg4_dinov2": _vit(14, 1024, 24, 16, **_DINOV2, **_REG4),
    # Two blocks, 32 wide, 4 px patches: compiles in seconds, for tests and smoke runs.
    "vit_micro_patch4": _vit(4, 32, 2, 2),
}
