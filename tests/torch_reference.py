"""PyTorch reference models with non-trivial BatchNorm statistics (for parity tests; needs torch)."""

import numpy as np
import torch


def he_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """He-normal weights and small non-zero biases, so signals keep their scale through a deep plain network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.05, generator=g)
    return model


def calibrate_batchnorm(model: torch.nn.Module, size: int = 64, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm gamma/beta, then running statistics measured on one batch of noise; eval mode.

    Random running statistics that do not fit the activations make a deep network forget its input; one batch's
    statistics keep it input-dependent (see parity.assert_parity) while being far from the trivial 0/1.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model.train()(torch.randn((8, 3, size, size), generator=g))
    return model.eval()


def logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The model's outputs for NHWC numpy images."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
