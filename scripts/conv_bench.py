"""XLA's convolutions against PyTorch's (oneDNN) at a model's own shapes, one operation at a time.

    python scripts/conv_bench.py --model resnet50 --image-size 160 --batch-size 32

`scripts/profile_step.py` says which kinds of operation a step spends its time in; this script says how fast the
convolution libraries are at exactly those operations. It traces the model's inference-mode forward pass and
collects every `conv_general_dilated` (the k x k convolutions) and every 2-D matrix product (tljax's 1x1
convolutions and dense layers, `conv.matmul`; the attention's batched products are left out), grouped by shape.
For each shape it times, alone and compiled, the forward pass, the input gradient and the kernel gradient:

* XLA: the traced operation, its input and kernel gradients each compiled on its own from `jax.vjp` (the forward
  pass is not part of them), with tljax's XLA options (`conv.compiler_options`);
* PyTorch, with `torch.set_num_threads` = the cores of the process's affinity mask: a convolution as
  `aten.convolution` and `aten.convolution_backward` (one output each) in channels_last, the layout in which
  oneDNN is fastest on this CPU; a product as `torch.mm`.

Medians of `--rounds` rounds, XLA and PyTorch alternating. The totals weight each shape by how often the model uses
it; the input gradient of a convolution of the image (3 input channels) is left out of them (no step computes it).
The forward column is what an eval pass and phase 1 spend in convolutions; all three columns what phase 2 does.
float32; PyTorch comes with the `parity` extra. Only ratios from one run compare on a shared machine.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import argparse
import collections
import functools
import json
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch_bench  # scripts/torch_bench.py, beside this script
from benchmark import CLASSES, _random_variables

from tljax import models
from tljax.models import conv
from tljax.models.conv import matmul

DIRECTIONS = ("fwd", "dx", "dw")


def _eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters (jit, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def conv_shapes(name: str, size: int, batch: int) -> collections.Counter:
    """{operation: times the forward pass runs it}: ("conv", x shape NHWC, kernel shape HWIO, stride, ((top, bottom),
    (left, right)) padding) or ("matmul", x shape [rows, C], kernel shape [C, D]) for a 2-D product (tljax's 1x1
    convolutions and dense layers, `conv.matmul`)."""
    model = models.create(name, CLASSES)
    variables = _random_variables(model, size)
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, image).jaxpr
    shapes: collections.Counter = collections.Counter()
    for eqn in _eqns(jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            x, w = (v.aval.shape for v in eqn.invars)
            p = eqn.params
            nhwc_hwio = p["dimension_numbers"][:2] == ((0, 3, 1, 2), (3, 2, 0, 1))
            if (not nhwc_hwio or p["feature_group_count"] != 1 or p["batch_group_count"] != 1
                    or set(p["lhs_dilation"] + p["rhs_dilation"]) != {1} or len(set(p["window_strides"])) != 1):
                raise SystemExit(f"conv_bench: no PyTorch counterpart for {eqn}")
            shapes[("conv", x, w, p["window_strides"][0], tuple(map(tuple, p["padding"])))] += 1
        elif eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"] == (((1,), (0,)), ((), ())):
            x, w = (v.aval.shape for v in eqn.invars)
            if len(x) == len(w) == 2:
                shapes[("matmul", x, w)] += 1
    return shapes


def _out_shape(x, w, stride, pad) -> tuple[int, int, int, int]:
    return (x[0], *((n + sum(p) - k) // stride + 1 for n, k, p in zip(x[1:3], w[:2], pad)), w[3])


def _vjps(forward: Callable, x: jax.Array, w: jax.Array, dy: jax.Array) -> dict[str, tuple[Callable, tuple]]:
    """{direction: (compiled function, its arguments)}; each gradient alone, without the forward pass."""
    jit = functools.partial(jax.jit, compiler_options=conv.compiler_options())
    return {"fwd": (jit(forward), (x, w)),
            "dx": (jit(lambda dy: jax.vjp(lambda x: forward(x, w), x)[1](dy)[0]), (dy,)),
            "dw": (jit(lambda dy: jax.vjp(lambda w: forward(x, w), w)[1](dy)[0]), (dy,))}


def xla_ops(op: tuple) -> dict[str, tuple[Callable, tuple]]:
    """The operation as tljax computes it: `lax.conv_general_dilated` as traced, or `conv.matmul`."""
    rng = np.random.default_rng(0)
    if op[0] == "matmul":
        _, x, w = op
        out, forward = (x[0], w[1]), matmul
    else:
        _, x, w, stride, pad = op
        out = _out_shape(x, w, stride, pad)

        def forward(x, w):
            return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _vjps(forward, *(jnp.asarray(rng.standard_normal(s, np.float32)) for s in (x, w, out)))


def torch_ops(op: tuple) -> dict[str, tuple[Callable, tuple]]:
    """The operation in PyTorch: a product with `torch.mm` (its gradients: dy w^T and x^T dy), a convolution with
    oneDNN in channels_last. Padding PyTorch cannot express (more at the bottom/right, TF's "SAME") is applied to
    the input beforehand."""
    torch, _ = torch_bench._import_torch()
    rng = np.random.default_rng(0)
    if op[0] == "matmul":
        _, x, w = op
        xs, ws, dy = (torch.from_numpy(rng.standard_normal(s, np.float32)) for s in (x, w, (x[0], w[1])))
        return {"fwd": (torch.mm, (xs, ws)), "dx": (lambda dy, w: torch.mm(dy, w.t()), (dy, ws)),
                "dw": (lambda x, dy: torch.mm(x.t(), dy), (xs, dy))}
    _, x, w, stride, pad = op
    extra = [p[1] - p[0] for p in pad]
    x_pad = (x[0], x[1] + extra[0], x[2] + extra[1], x[3])

    def tensor(shape, perm):
        return torch.from_numpy(rng.standard_normal(shape, np.float32)).permute(*perm).contiguous(
            memory_format=torch.channels_last)

    xs, ws = tensor(x_pad, (0, 3, 1, 2)), tensor(w, (3, 2, 0, 1))
    dy = tensor(_out_shape(x, w, stride, pad), (0, 3, 1, 2))
    args = ((stride, stride), (pad[0][0], pad[1][0]), (1, 1), False, (0, 0), 1)

    def backward(mask):
        return lambda dy, x, w: torch.ops.aten.convolution_backward(dy, x, w, None, *args, mask)
    return {"fwd": (lambda x, w: torch.ops.aten.convolution(x, w, None, *args), (xs, ws)),
            "dx": (backward((True, False, False)), (dy, xs, ws)),
            "dw": (backward((False, False, True)), (dy, xs, ws))}


def _seconds(fn: Callable, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def measure(shapes: collections.Counter, rounds: int, calls: int) -> list[dict]:
    """One row per shape: its count, GFLOP per direction and the median milliseconds of each system."""
    torch, _ = torch_bench._import_torch()
    torch.set_num_threads(torch_bench.threads())
    rows = []
    for op, count in shapes.items():
        ops = {"xla": xla_ops(op), "torch": torch_ops(op)}
        samples = {(s, d): [] for s in ops for d in DIRECTIONS}
        with torch.no_grad():
            for key in samples:
                _seconds(*ops[key[0]][key[1]], 1)  # compile / warm up
            for r in range(rounds):
                for key in list(samples)[:: 1 if r % 2 == 0 else -1]:
                    samples[key].append(_seconds(*ops[key[0]][key[1]], calls))
        x, w = op[1:3]
        out = (x[0], w[1]) if op[0] == "matmul" else _out_shape(*op[1:])
        row = {"op": op, "count": count, "gflop": 2 * np.prod(out) * np.prod(w[:-1]) / 1e9,
               "image_input": op[0] == "conv" and x[3] == 3}
        row.update({f"{s}_{d}_ms": 1e3 * statistics.median(v) for (s, d), v in samples.items()})
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    kind, x, w, *conv = row["op"]
    name = (f"{x[0]}x{x[1]} @ {w[0]}x{w[1]}" if kind == "matmul"
            else f"{w[0]}x{w[1]}/{conv[0]} {w[2]:>4}->{w[3]:<4} at {x[1]:>3}px")
    cells = " ".join(f"{row[f'xla_{d}_ms']:7.1f} {row[f'torch_{d}_ms']:7.1f}" for d in DIRECTIONS)
    return f"{name:26s} x{row['count']:<2} {row['gflop']:6.2f} {cells}"


def totals(rows: list[dict]) -> dict[str, float]:
    """Milliseconds per system and direction, each shape times its count (no input gradient of the image)."""
    out = {}
    for system in ("xla", "torch"):
        for d in DIRECTIONS:
            out[f"{system}_{d}_ms"] = sum(r["count"] * r[f"{system}_{d}_ms"] for r in rows
                                          if not (d == "dx" and r["image_input"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--json", help="write the rows and totals here")
    args = parser.parse_args()
    shapes = conv_shapes(args.model, args.image_size, args.batch_size)
    print(f"{'operation':26s} {'n':3s} {'GFLOP':>6s} " + " ".join(f"{d + ' xla':>7s} {'torch':>7s}" for d in DIRECTIONS))
    rows = measure(shapes, args.rounds, args.calls)
    total = totals(rows)
    print("total ms   " + " ".join(f"{d}: xla {total[f'xla_{d}_ms']:.0f} torch {total[f'torch_{d}_ms']:.0f} "
                                   f"({total[f'xla_{d}_ms'] / total[f'torch_{d}_ms']:.2f}x)" for d in DIRECTIONS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "totals": total}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
