"""Where a compiled step's time goes on CPU: XLA's own per-operation timings, summed by kind of operation.

    python scripts/profile_step.py --model resnet50 --image-size 160 --batch-size 32 --phase phase2

Method: the benchmark's step (`scripts/benchmark.py`: random weights, micro-batches, donated state) is compiled and
warmed up, then run `--steps` times under `jax.profiler.trace`. XLA's CPU runtime records one trace event per
executed HLO operation (thunk), on the thread that ran it, with the operation's name; every event's duration is
added to the class of its operation, found in the compiled module's text:

* "conv kxk weight grad": a convolution (or the fusion XLA hands one to YNNPACK in, "ynn_fusion") whose output has
  a kernel's shape (the gradient of a k x k kernel, k > 1);
* "conv kxk fwd / input grad": the other convolutions (the stem's 7x7, the 3x3s, their input gradients);
* "matmul (1x1 conv, dense)": dots, and fusions around a dot (tljax computes 1x1 convolutions as products);
* "batchnorm": the other operations of the BatchNorm layers (their names hold the layer's "bn" scope);
* "layout copies": copies and transposes, with whatever XLA fused into them (it re-lays activations out for the
  weight-gradient convolutions, often fused with the BatchNorm that produces them);
* "elementwise and other model ops": the rest of the forward and backward pass (ReLU, residual sums, pooling,
  padding, the gradients' sums);
* "optimizer, loss, metrics": operations outside the model's forward and backward pass (their name holds neither
  `jvp(` nor `transpose(`): the Adam update over every parameter, plus the loss and metric sums of a 10-way head.

Shares are of the summed operation time. Operations run on several threads at once, so the sum exceeds the step's
wall time; the report gives both. The step compiles with tljax's XLA options (`conv.compiler_options`), which on CPU
give the k x k convolutions to Eigen: Eigen's convolutions run on its own threads after the traced event, which
covers only their launch, so the two convolution classes count almost nothing there; the other classes stay exact.
XLA's default (YNNPACK's convolutions, whose events cover their work) is what README's breakdown was measured with.
Only relative figures from one run mean anything on a shared machine.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import argparse
import collections
import glob
import re
import tempfile
import time

import jax
import numpy as np
from benchmark import CLASSES, _phase_step, _random_variables

from tljax import models
from tljax.training import parallel

CLASSES_ORDER = ("conv kxk weight grad", "conv kxk fwd / input grad", "matmul (1x1 conv, dense)", "batchnorm",
                 "layout copies", "elementwise and other model ops", "optimizer, loss, metrics")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*)$")


def _instructions(hlo: str) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """({instruction name: {"opcode", "shape", "op_name", "calls"}}, {computation: the opcodes it holds})."""
    instructions, opcodes, computation = {}, collections.defaultdict(set), None
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.-]+)", rest)
        instructions[name] = {"opcode": opcode, "shape": shape, "op_name": op_name.group(1) if op_name else "",
                              "calls": calls.group(1) if calls else None}
        opcodes[computation].add(opcode)
    return instructions, opcodes


def _dims(shape: str) -> tuple[int, ...]:
    inner = shape[shape.index("[") + 1:shape.index("]")]
    return tuple(int(d) for d in inner.split(",") if d)


def classify(instruction: dict, opcodes: dict[str, set[str]], kernel_shapes: set[tuple[int, ...]]) -> str:
    """The class (one of `CLASSES_ORDER`) of an HLO instruction of the step."""
    opcode, op_name = instruction["opcode"], instruction["op_name"]
    inside = opcodes.get(instruction["calls"], set()) if opcode == "fusion" else {opcode}
    if "convolution" in inside:
        out = _dims(instruction["shape"])
        as_kernel = (out[1], out[2], out[0], out[3]) if len(out) == 4 else None
        return "conv kxk weight grad" if as_kernel in kernel_shapes else "conv kxk fwd / input grad"
    if "dot" in inside:
        return "matmul (1x1 conv, dense)"
    if inside & {"copy", "transpose"}:
        return "layout copies"
    if "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer, loss, metrics"
    if re.search(r"/(?:\w+_)?bn\d*/", op_name):
        return "batchnorm"
    return "elementwise and other model ops"


def profile(name: str, size: int, batch: int, phase: str, steps: int, dtype: str = "float32", top: int = 15
            ) -> dict:
    """{"wall_s_per_step", "op_s_per_step", "classes": {class: seconds per step}, "top": the `top` costliest
    operations [(name, class, seconds per step, JAX's name of it)]} for the benchmark's `phase` ("phase1" or
    "phase2")."""
    model = models.create(name, CLASSES, dtype=dtype)
    variables = _random_variables(model, size)
    trainable = {"phase1": "^head/", "phase2": "."}[phase]
    fn, state = _phase_step(model, variables, trainable, micro_batches=parallel.micro_batches(batch), donate=True)
    rng = np.random.default_rng(1)
    data = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, batch).astype(np.int32)}
    instructions, opcodes = _instructions(fn.lower(state, data).compile().as_text())
    kernel_shapes = {tuple(x.shape) for x in jax.tree.leaves(variables["params"]) if x.ndim == 4}
    for _ in range(2):  # compile and warm up
        state = jax.block_until_ready(fn(state, data)[0])
    folder = tempfile.mkdtemp(prefix="tljax-profile-")
    start = time.perf_counter()
    with jax.profiler.trace(folder):
        for _ in range(steps):
            state = jax.block_until_ready(fn(state, data)[0])
    wall = (time.perf_counter() - start) / steps
    trace = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[-1])
    per_op = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    per_op[event.name] += event.duration_ns * 1e-9 / steps
    classes = collections.Counter()
    for op, seconds in per_op.items():
        classes[classify(instructions[op], opcodes, kernel_shapes)] += seconds
    costliest = [(op, classify(instructions[op], opcodes, kernel_shapes), s, instructions[op]["op_name"])
                 for op, s in per_op.most_common(top)]
    return {"wall_s_per_step": wall, "op_s_per_step": sum(per_op.values()), "classes": dict(classes),
            "top": costliest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=models.names())
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--phase", default="phase2", choices=["phase1", "phase2"])
    parser.add_argument("--steps", type=int, default=3, help="steps traced (after two untraced ones)")
    parser.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES))
    parser.add_argument("--top", type=int, default=15, help="list this many of the costliest operations")
    args = parser.parse_args()
    result = profile(args.model, args.image_size, args.batch_size, args.phase, args.steps, args.dtype, args.top)
    total = result["op_s_per_step"]
    print(f"{args.model} {args.image_size}px batch {args.batch_size} {args.dtype} {args.phase}: "
          f"{result['wall_s_per_step']:.3f} s per step (wall, traced), {total:.3f} s of operations over all threads")
    for name in CLASSES_ORDER:
        seconds = result["classes"].get(name, 0.0)
        print(f"  {name:34s} {seconds:7.3f} s  {100 * seconds / total:5.1f}%")
    print("costliest operations:")
    for op, kind, seconds, op_name in result["top"]:
        print(f"  {op:32s} {kind:32s} {seconds:7.3f} s  {op_name.removeprefix('jit(train_step)/')}")


if __name__ == "__main__":
    main()
