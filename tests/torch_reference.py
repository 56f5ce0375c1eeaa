"""The PyTorch side of the parity tests: real torchvision, timm and lukemelas models with calibrated BatchNorm (or,
for the LayerNorm networks, random norm, bias and layer-scale parameters).

Needs the `parity` extra (torch, torchvision, timm, efficientnet_pytorch, efficientnet_lite_pytorch); never imported
by tljax itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def _timm(name: str, size: int) -> torch.nn.Module:
    """timm's model `name` with a 1000-way classifier (DINOv2's default has none); a ViT is built for `size` px
    (its position embeddings have that grid)."""
    import timm

    return timm.create_model(name, num_classes=1000, **({"img_size": size} if name.startswith("vit_") else {}))


def _torchvision(name: str, size: int) -> torch.nn.Module:
    """torchvision's model `name`; a ViT is built for `size` px (its position embeddings have that grid)."""
    import torchvision

    return getattr(torchvision.models, name)(**({"image_size": size} if name.startswith("vit_") else {}))


def _lukemelas(name: str, size: int) -> torch.nn.Module:
    """lukemelas `efficientnet_pytorch` (B0..B7) and `efficientnet_lite_pytorch` (Lite0..4), by tljax's name.

    Their TF "SAME" padding is computed once, for the image size given here: inputs of another size are padded as
    TF would pad that size, not theirs.
    """
    if "lite" in name:
        import efficientnet_lite_pytorch as module
    else:
        import efficientnet_pytorch as module
    return module.EfficientNet.from_name(name.replace("_", "-"), image_size=size)


LIBRARIES: dict[str, Callable[[str, int], torch.nn.Module]] = {
    "torchvision": _torchvision, "timm": _timm, "lukemelas": _lukemelas,
}


def build(library: str, name: str, size: int = 64, seed: int = 0) -> torch.nn.Module:
    """The library's own model `name`, for `size` px inputs, with its random initialisation (seeded)."""
    torch.manual_seed(seed)
    return LIBRARIES[library](name, size)


def calibrate_batchnorm(model: torch.nn.Module, size: int = 64, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm affine parameters and running statistics measured on data, then perturbed; eval mode.

    Scale U(0.5, 1.5), bias N(0, 0.1); running statistics as the cumulative average (`momentum=None`) of three
    train-mode passes on random `size` px inputs; then every statistic times U(0.9, 1.1). Random statistics that do
    not fit the activations make a deep network ignore its input, and then any two networks "agree"; measured ones
    keep it input-dependent, and the perturbation keeps them from being exactly the batch's.
    """
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for _ in range(3):
            model(torch.randn((8, 3, size, size), generator=g))
        model.eval()
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                stat.mul_(torch.empty_like(stat).uniform_(0.9, 1.1, generator=g))
    return model


def randomize_constants(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter its library initialises to a constant or to almost nothing (biases,
    LayerNorm scales, layer scales, class and register tokens): scales U(0.5, 1.5), the others N(0, 0.1) (as
    `calibrate_batchnorm` draws BatchNorm's); eval mode.

    With them at their initial values (layer scales of 1e-6, zero biases and tokens) a transformer or ConvNeXt block
    adds next to nothing to its input, so a wrong mapping of most of its weights would go unseen.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and p.std() > 1e-3:
                continue
            if p.numel() > 0 and p.abs().mean() > 0.5:  # a scale initialised to 1
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> Path:
    """The state dict as `.safetensors`, or with `torch.save` (zip format) for any other suffix."""
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


def logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The model's outputs for NHWC images, computed in the images' dtype (float64 images: on a float64 copy)."""
    if images.dtype == np.float64:
        model = copy.deepcopy(model).double()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
