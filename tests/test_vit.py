"""ViT and DINOv2: sizes, input checks, attention memory, stochastic depth, bfloat16, position-embedding resampling
against timm's, Google's `.npz` layout, mismatched checkpoints, and a training run with export.

Parity with timm's and torchvision's ViTs is in tests/test_parity_torch.py; here the reference is a timm ViT of the
tiny preset's shape (`vit_micro_patch4`: 2 blocks, 32 wide, 4 px patches) where a whole network is needed.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import parity, train_util
from tljax import config as config_lib
from tljax import models, pretrained
from tljax.data import ConfigError
from tljax.models import vit
from tljax.pretrained.mappings.vit import resample_matrix
from tljax.runs import restore
from tljax.training import optim

# Parameter counts with a 1000-way classifier, at the weights' native size, of timm's models of the same names.
PARAMETERS = {
    "vit_tiny_patch16": 5_717_416,
    "vit_small_patch16": 22_050_664,
    "vit_base_patch16": 86_567_656,
    "vit_base_patch32": 88_224_232,
    "vit_large_patch16": 304_326_632,
    "vit_small_patch14_dinov2": 22_441_192,
    "vit_base_patch14_dinov2": 87_348_712,
    "vit_large_patch14_dinov2": 305_392_616,
    "vit_small_patch14_reg4_dinov2": 22_442_344,
    "vit_base_patch14_reg4_dinov2": 87_351_016,
    "vit_large_patch14_reg4_dinov2": 305_395_688,
}
MICRO = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}  # timm's arguments for vit_micro_patch4
# A convolution or matrix product in StableHLO text: group 1 holds its operands' types.
PRODUCT = re.compile(r"stablehlo\.(?:convolution|dot_general)\b.*:\s*\((.*)\)\s*->\s*(.*)$")


def _abstract(model, size: int):
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)


@pytest.mark.parametrize("name", PARAMETERS)
def test_parameter_counts_match_timm(name):
    model = models.create(name, 1000)
    variables = _abstract(model, model.backbone.native_size)
    assert set(variables) == {"params"}  # no BatchNorm statistics
    assert sum(x.size for x in jax.tree.leaves(variables)) == PARAMETERS[name]


def test_image_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="that 16 divides, not 40x40"):
        _abstract(models.create("vit_small_patch16", 3), 40)
    cfg = config_lib.defaults()
    cfg.model.name, cfg.data.image_size, cfg.data.source = "vit_small_patch14_dinov2", 224 + 7, "tf_flowers"
    with pytest.raises(ConfigError, match=r"config.data.image_size 231 .* patch size 14: choose e.g. 224"):
        config_lib.validate(cfg)


def test_input_of_another_grid_is_refused_naming_the_fix():
    model = models.create("vit_micro_patch4", 3)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"pos_embed holds 16 patch positions, .* 36 patches.*image_size=24"):
        model.apply(variables, jnp.zeros((1, 24, 24, 3)))


def test_bn_train_is_refused_for_a_backbone_without_batchnorm():
    cfg = config_lib.defaults()
    cfg.model.name, cfg.data.image_size, cfg.data.source = "vit_small_patch16", 224, "tf_flowers"
    cfg.phases[1].bn = "train"
    with pytest.raises(ConfigError, match=r"config.phases\[1\].bn='train' .* vit_small_patch16 has none: set "
                                          r"config.phases\[1\].bn='frozen'"):
        config_lib.validate(cfg)
    cfg.phases[1].bn = "frozen"
    config_lib.validate(cfg)


@pytest.mark.parametrize("dtype, itemsize", [(jnp.float32, 4), (jnp.bfloat16, 4)])  # bfloat16: float32 logits
def test_attention_holds_one_tokens_by_tokens_matrix_per_head(dtype, itemsize):
    """The compiled attention's scratch memory is one (tokens x tokens) matrix per head, not the two (logits and
    probabilities) of computing all queries at once, which `jax.nn.dot_product_attention` alone needs."""
    tokens, heads = 512, 2
    q = jax.ShapeDtypeStruct((1, tokens, heads, 8), dtype)
    matrices = heads * tokens * tokens * itemsize
    ours = jax.jit(vit.attention).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    whole = jax.jit(jax.nn.dot_product_attention).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    assert ours <= 1.1 * matrices and whole >= 1.4 * matrices
    rng = np.random.default_rng(0)
    x = [jnp.asarray(rng.normal(size=(2, 37, 3, 8)), dtype) for _ in range(3)]
    np.testing.assert_allclose(np.float32(vit.attention(*x)), np.float32(jax.nn.dot_product_attention(*x)),
                               atol=1e-6 if dtype == jnp.float32 else 1e-2)


def test_stochastic_depth_only_in_training_mode():
    model = models.create("vit_micro_patch4", 3, drop_path_rate=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)

    def features(m, train):
        return jax.jit(functools.partial(m.apply, train=train, method="features"))(
            variables, x, rngs={"dropout": jax.random.key(1)})

    inference = features(model, False)
    assert not np.allclose(features(model, True), inference)
    # Without drop_path_rate, training mode changes nothing (the backbone has no other randomness).
    np.testing.assert_allclose(features(models.create("vit_micro_patch4", 3), True), inference, rtol=1e-6,
                               atol=1e-6)


def test_bfloat16_products_float32_norms_and_outputs():
    """bfloat16 compute: every matrix product reads bfloat16; LayerNorms and features stay float32; the features
    move by bfloat16's rounding, not more."""
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = models.create("vit_micro_patch4", 3, dtype=dtype)
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
        fn = jax.jit(functools.partial(model.apply, method="features"))
        program = fn.lower(variables, x).as_text()
        operands = [m.group(1) for m in map(PRODUCT.search, program.splitlines()) if m]
        assert operands and all("xbf16>" in types for types in operands) == (dtype == "bfloat16"), operands
        out[dtype] = np.asarray(fn(variables, x))
        assert out[dtype].dtype == np.float32
    err = np.abs(out["bfloat16"] - out["float32"]).max() / np.abs(out["float32"]).max()
    assert 1e-4 < err < 5e-2


def test_trainable_patterns_and_layer_decay_reach_blocks_by_name():
    """`block11` names the last block; with layer_decay d, the update of block i is d ** (depth - i) of the head's
    (embedding at depth 0, block i at i + 1, final norm with the head at depth + 1)."""
    params = _abstract(models.create("vit_small_patch16", 3), 32)["params"]
    labels = optim.param_labels(params, "block11|^head/")
    flat = {optim.path_name(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat["backbone/block11/attn/query/kernel"] == "backbone"
    assert flat["backbone/block10/fc2/kernel"] == flat["backbone/embed/pos_embed"] == "frozen"
    assert flat["head/out/kernel"] == "head"

    model = models.create("vit_micro_patch4", 3)
    variables = _abstract(model, 16)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), variables["params"])
    phase = config_lib.phase(trainable=".", layer_decay=0.5, optimizer={"name": "sgd", "learning_rate": 1.0})
    labels = optim.param_labels(params, phase.trainable)
    tx = optim.build(phase, labels, 1, depths=models.layer_depths(model))
    updates, _ = tx.update(jax.tree.map(np.ones_like, params), tx.init(params), params)
    scale = {name: -float(np.asarray(leaf).ravel()[0]) for name, leaf in (
        (optim.path_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(updates))}
    assert scale["backbone/embed/cls_token"] == scale["backbone/embed/patch/kernel"] == 0.5 ** 3
    assert scale["backbone/block0/attn/query/kernel"] == 0.5 ** 2
    assert scale["backbone/block1/fc1/bias"] == 0.5
    assert scale["backbone/norm/scale"] == scale["head/out/kernel"] == 1.0


# --- PyTorch references (the parity extra) -------------------------------------------------------------------------


def _timm_vit(size: int, seed: int = 0, **kwargs):
    """A timm VisionTransformer of vit_micro_patch4's shape (or as `kwargs` change it) for `size` px, with random
    norms, biases, tokens and layer scales."""
    torch_reference = pytest.importorskip("tests.torch_reference")
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return torch_reference.randomize_constants(VisionTransformer(img_size=size, **{**MICRO, **kwargs}), seed)


# (timm arguments, tljax arguments) of the ViT layouts: plain; DINOv2's layer scale and registers without position
# embeddings of the class and register tokens.
LAYOUTS = {"plain": ({}, {}),
           "registers": ({"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True},
                         {"layer_scale": True, "register_tokens": 4, "embed_prefix": False})}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_micro_vit_and_both_poolings_match_timm(tmp_path, layout, pool):
    torch_reference = pytest.importorskip("tests.torch_reference")
    timm_kwargs, kwargs = LAYOUTS[layout]
    reference = _timm_vit(16, **timm_kwargs, global_pool=pool, fc_norm=False)
    path = torch_reference.save(reference, tmp_path / "micro.safetensors")
    model, variables, _ = pretrained.load("vit_micro_patch4", path, image_size=16, pool=pool, **kwargs)
    x = parity.inputs(size=16)
    err = parity.assert_parity(parity.float64_outputs(model, variables, x), torch_reference.logits(reference, x),
                               parity.RTOL_FLOAT64)
    assert err < 1e-12


@pytest.mark.parametrize("old, new", [(4, 7), (7, 5), (6, 6)])
def test_resample_matrix_is_pytorchs_antialiased_bicubic(old, new):
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(old * new).normal(size=(1, 3, old, old))
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(new, new), mode="bicubic",
                                               antialias=True).numpy()
    weights = resample_matrix(old, new)
    np.testing.assert_allclose(np.einsum("ij,bcjk,lk->bcil", weights, grid, weights), expected, atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("old, new", [(16, 28), (28, 20)])
def test_position_embeddings_resampled_as_timm_loads_another_size(tmp_path, layout, old, new):
    """A checkpoint of `old` px loaded for `new` px gives the logits of timm's model built for `new` px from the same
    state dict (timm's loader resamples the embeddings: `checkpoint_filter_fn`), up and down, with and without the
    class token's embedding."""
    torch_reference = pytest.importorskip("tests.torch_reference")
    from timm.models.vision_transformer import checkpoint_filter_fn

    timm_kwargs, kwargs = LAYOUTS[layout]
    source = _timm_vit(old, **timm_kwargs)
    reference = _timm_vit(new, seed=1, **timm_kwargs)
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    path = torch_reference.save(source, tmp_path / "old.safetensors")
    model, variables, _ = pretrained.load("vit_micro_patch4", path, image_size=new, **kwargs)
    grid = (new // 4) ** 2
    assert variables["params"]["backbone"]["embed"]["pos_embed"].shape[1] == grid + (0 if kwargs else 1)
    x = parity.inputs(size=new)
    parity.assert_parity(parity.float64_outputs(model, variables, x), torch_reference.logits(reference.eval(), x),
                         parity.RTOL_FLOAT64)


def _google_npz(model, path: Path) -> Path:
    """A timm ViT written in google-research/vision_transformer's `.npz` layout (the augreg checkpoints'): Flax
    kernels (in, out) and HWIO, attention projections split per head (in, heads, head_dim) / (heads, head_dim, out),
    blocks `Transformer/encoderblock_{i}` with LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, width = model.blocks[0].attn.num_heads, sd["cls_token"].shape[-1]
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        attention = f"{dst}/MultiHeadDotProductAttention_1"
        for part, name in enumerate(("query", "key", "value")):
            rows = slice(part * width, (part + 1) * width)
            out[f"{attention}/{name}/kernel"] = sd[f"{src}.attn.qkv.weight"][rows].T.reshape(width, heads, -1)
            out[f"{attention}/{name}/bias"] = sd[f"{src}.attn.qkv.bias"][rows].reshape(heads, -1)
        out[f"{attention}/out/kernel"] = sd[f"{src}.attn.proj.weight"].T.reshape(heads, -1, width)
        out[f"{attention}/out/bias"] = sd[f"{src}.attn.proj.bias"]
        for norm, torch_norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{dst}/{norm}/scale"], out[f"{dst}/{norm}/bias"] = (sd[f"{src}.{torch_norm}.{t}"]
                                                                     for t in ("weight", "bias"))
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{dst}/MlpBlock_3/{dense}/kernel"] = sd[f"{src}.mlp.{fc}.weight"].T
            out[f"{dst}/MlpBlock_3/{dense}/bias"] = sd[f"{src}.mlp.{fc}.bias"]
    np.savez(path, **out)
    return path


def test_google_npz_checkpoint_matches_timm(tmp_path):
    torch_reference = pytest.importorskip("tests.torch_reference")
    reference = _timm_vit(16)
    path = _google_npz(reference, tmp_path / "augreg.npz")
    weights = pretrained.read("vit_micro_patch4", path)
    assert (weights.format, weights.convention.name) == ("flax", "vision_transformer")
    assert (weights.prep.mean, weights.prep.crop_fraction, weights.prep.interpolation) == ((0.5,) * 3, 0.9, "bicubic")
    model, variables = weights.build(image_size=16)
    x = parity.inputs(size=16)
    parity.assert_parity(parity.float64_outputs(model, variables, x), torch_reference.logits(reference, x),
                         parity.RTOL_FLOAT64)
    # A new head reads past the file's; at 32 px the position embeddings are resampled.
    model, variables, _ = pretrained.load("vit_micro_patch4", path, num_classes=5, image_size=32)
    assert model.apply(variables, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 5)


class _Canary:
    """Unpickling this object creates the file `path` names: evidence that a reader unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    canary = tmp_path / "unpickled"
    np.savez(tmp_path / "evil.npz", **{"cls": np.zeros((1, 1, 32)),
                                       "head/kernel": np.array([_Canary(canary)], dtype=object)})
    pickle.loads(pickle.dumps(_Canary(tmp_path / "works")))  # the canary does fire when unpickled
    assert (tmp_path / "works").exists()
    with pytest.raises(pretrained.WeightsFileError, match=r"evil.npz: holds object arrays"):
        pretrained.load("vit_micro_patch4", tmp_path / "evil.npz")
    assert not canary.exists()


def test_checkpoint_of_another_shape_or_family_is_refused_with_a_listing(tmp_path):
    """A deeper or wider ViT lists what is missing, unused and wrong-shaped; a ViT file given to a ConvNeXt names its
    family, and with the convention forced, lists the tensors."""
    torch_reference = pytest.importorskip("tests.torch_reference")
    deeper = torch_reference.save(_timm_vit(16, depth=3, embed_dim=48), tmp_path / "deeper.safetensors")
    with pytest.raises(pretrained.WeightsMismatchError) as info:
        pretrained.load("vit_micro_patch4", deeper)
    message = str(info.value)
    assert "in the file but unused by the model" in message and "blocks.2.attn.qkv.weight" in message
    assert "wrong shape" in message and "blocks.0.attn.qkv.weight: (144, 48) in the file" in message
    assert "missing" not in message  # every tensor of the 2-block model is there, in another shape
    shallower = torch_reference.save(_timm_vit(16, depth=1), tmp_path / "shallower.safetensors")
    with pytest.raises(pretrained.WeightsMismatchError, match=r"missing from the file \(\d+\):\n    blocks\.1\.norm1"):
        pretrained.load("vit_micro_patch4", shallower)
    with pytest.raises(pretrained.WeightsMismatchError, match=r"they are vit \(timm\) weights"):
        pretrained.load("convnext_tiny", deeper)
    with pytest.raises(pretrained.WeightsMismatchError, match=r"(?s)missing from the file.*in the file but unused"):
        pretrained.load("convnext_tiny", deeper, num_classes=3, convention="timm")


def test_training_run_with_cached_features_then_export_and_evaluate(tmp_path):
    """The tiny ViT through the whole tool chain: phase 1 on cached features, phase 2 the whole backbone with layer
    decay; the export gives the run's logits back; evaluate reproduces the test accuracy; predict labels images."""
    from tests.tool_util import tool
    from tljax import predict

    folder = train_util.image_folder(tmp_path / "images", per_class=12, size=20)
    workdir = tmp_path / "run"
    result = train_util.cli(folder, workdir, "--config.model.name=vit_micro_patch4", "--config.phases[0].epochs=1",
                            "--config.phases[0].cache_features=True", "--config.phases[1].epochs=1",
                            "--config.phases[1].bn=frozen", "--config.phases[1].layer_decay=0.75")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["phases"][1]["name"] == "all" and summary["test_accuracy"] is not None
    run = restore.load(str(workdir))
    assert "batch_stats" not in run.variables or not run.variables["batch_stats"]
    exported = tool("export", f"--workdir={workdir}", f"--output={tmp_path / 'model.safetensors'}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    model, variables, prep = pretrained.load("vit_micro_patch4", tmp_path / "model.safetensors")
    images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(model.apply(variables, images), run.logits_fn(4)(images), rtol=1e-5, atol=1e-5)
    evaluated = tool("evaluate", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
    assert scores["accuracy"] == summary["test_accuracy"]
    predictions, errors = predict.predict(run, sorted(str(f) for f in folder.glob("class0/*.png")), top_k=2)
    assert not errors and len(predictions) == 12 and all(p.classes[0] in run.class_names for p in predictions)
