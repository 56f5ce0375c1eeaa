"""The benchmark's PyTorch side (`scripts/benchmark.py --compare torch`): torchvision's model of the same
architecture, run eagerly and under `torch.compile`, with the phases tljax's benchmark times.

The model is torchvision's, with the head tljax puts on the backbone: ResNets' `fc` and EfficientNets' last
classifier layer replaced by a new layer of `CLASSES` outputs (EfficientNet keeps its dropout, as tljax's head
does); VGG16 ends as tljax's default VGG16 does, global average pooling and one new layer on the 512 features.
Every phase uses its own copy of the model (as the Keras side builds one model per phase), random weights:

* eval: `model.eval()` under `torch.inference_mode()`, logits of the batch;
* phase1: only the new layer requires grad, BatchNorm (and stochastic depth) in eval mode, the head's dropout in
  training mode; cross-entropy, backward, `torch.optim.Adam` step over the new layer;
* phase2: every parameter requires grad, the backbone in eval mode as in phase 1, Adam over all parameters.

Adam with learning rate 1e-3 and PyTorch's default settings, tljax's phase default (`config.phase`: optax.adam, lr
1e-3; both eps 1e-8). float32, NCHW (PyTorch's default layout), `torch.set_num_threads` set to the cores this
process may run on (its affinity mask, which XLA's CPU thread pool also sizes itself by). torch.compile (default
mode) compiles the model and the optimizer step; its compilation happens on the first call, which the benchmark
times separately as it does for XLA.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Callable

import numpy as np

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16",
                 *[f"efficientnet_b{i}" for i in range(8)])
SYSTEMS = ("torch", "torch_compile")  # the benchmark's names for eager and compiled PyTorch


def _import_torch():
    """torch and torchvision, or a clear error naming the extra that provides them."""
    # torch imports triton lazily (an optimizer does); triton's native library crashes a process that loaded
    # TensorFlow first (the benchmark's input pipeline does). On CPU triton is never used: make its import fail.
    sys.modules.setdefault("triton", None)
    try:
        import torch
        import torchvision
    except ImportError as e:
        raise SystemExit(f"--compare torch needs torch and torchvision: pip install -e '.[parity]' ({e})") from None
    return torch, torchvision


def threads() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build(name: str, classes: int) -> Any:
    """torchvision's `name` with random weights and a new head of `classes` outputs (see the module docstring)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"torchvision has no {name}; --compare torch supports {', '.join(ARCHITECTURES)}")
    torch, torchvision = _import_torch()
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        model.fc = torch.nn.Linear(model.fc.in_features, classes)
    elif name.startswith("efficientnet"):
        model.classifier[-1] = torch.nn.Linear(model.classifier[-1].in_features, classes)
    else:  # vgg16, as tljax's default: global average pooling of the last block, then the head
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        model.classifier = torch.nn.Linear(512, classes)
    return model


def _head(model: Any) -> Any:
    return getattr(model, "fc", None) or model.classifier


def steps(name: str, size: int, batch: int, classes: int, compiled: bool) -> dict[str, tuple[Callable, Any]]:
    """{"eval", "phase1", "phase2"} -> (step function, None), as `benchmark.measure` calls them; `compiled`: under
    torch.compile."""
    torch, _ = _import_torch()
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, classes, batch).astype(np.int64))
    base = build(name, classes)
    maybe_compile = torch.compile if compiled else (lambda fn: fn)

    eval_model = copy.deepcopy(base).eval()
    forward = maybe_compile(eval_model)

    def evaluate(carry):
        with torch.inference_mode():
            return forward(images)

    out = {"eval": (evaluate, None)}
    for phase, head_only in (("phase1", True), ("phase2", False)):
        model = copy.deepcopy(base).eval()  # BatchNorm and stochastic depth in eval mode ...
        _head(model).train()  # ... the head's dropout in training mode
        for p in model.parameters():
            p.requires_grad_(not head_only)
        for p in _head(model).parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        out[phase] = (_train_step(torch, maybe_compile(model), optimizer, maybe_compile(optimizer.step),
                                  images, labels), None)
    return out


def convolution_share(name: str, size: int, batch: int, classes: int, compiled: bool,
                      calls: int = 3) -> dict[str, float]:
    """{"eval", "phase1", "phase2"} -> the share of PyTorch's operation time (eager, or under torch.compile) spent
    in its convolutions (oneDNN's kernels, forward and both gradients), from torch.profiler's self CPU times over
    `calls` steps after three warm-up steps (the first compiles).

    Its inverse bounds any program whose convolution kernels are no faster than these: with everything else free,
    it would still take the convolutions' time, so it could not be faster than this PyTorch by more than 1 / share.
    """
    phases = steps(name, size, batch, classes, compiled)
    from torch.profiler import ProfilerActivity, profile

    shares = {}
    for phase, (step, carry) in phases.items():
        for _ in range(3):
            step(carry)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step(carry)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares[phase] = sum(e.self_cpu_time_total for e in events if "conv" in e.key.lower()) / total
    return shares


def _train_step(torch, model: Any, optimizer: Any, optimizer_step: Callable, images: Any, labels: Any) -> Callable:
    def step(carry):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer_step()
        return loss.detach()

    return step
