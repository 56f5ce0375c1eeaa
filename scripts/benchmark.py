"""Side-by-side speed of tljax, Keras 3 (JAX backend) and PyTorch on the same model, batch and machine, in one process.

    python scripts/benchmark.py --model resnet50 --image-size 160 --batch-size 32 --compare keras,torch --json b.json

Measures images/s of: the eval forward pass, the phase-1 step (backbone frozen), the phase-1 step on cached
features, the phase-2 step (everything trains, BatchNorm in inference mode) and the input pipeline (JPEG decode,
random-resized crop, flip, normalize on a generated folder of photos-sized JPEGs); with `--techniques`, also the
phase-2 step with the fine-tuning techniques on (`TECHNIQUES`: EMA of the weights, label smoothing, layer decay, and
mixup), whose cost phase2_techniques_vs_phase2 gives (the median of the rounds' ratios) beside the ratio of XLA's
FLOP counts; with `--compare keras`, the same phases in Keras (`base.trainable = False` / `True`, `train_on_batch`,
`predict_on_batch`); with `--compare torch`, in PyTorch, eager ("torch") and under torch.compile ("torch_compile"),
on torchvision's model (`scripts/torch_bench.py`; `--compare keras,torch` for both), and the share of their
operation time spent in convolutions (torch.profiler, after the rounds), whose inverse bounds the ratio to them of
any program whose convolution kernels are no faster than PyTorch's. Rounds interleave every
measurement of a model, in turn forwards and backwards (A B, B A, ...; the pipeline is timed after them, as its
threads keep working after its timed batches), the first call of each (compilation) is timed
separately and excluded, and each figure is the median of the rounds with its min-max. The eval and phase-2 rates
are also given as a share of this machine's best matmul rate (measured at the end), using XLA's own FLOP count of
each compiled step. Numbers depend on what else the machine is doing: compare ratios from one run, not figures
across runs.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch_bench  # noqa: E402  (scripts/torch_bench.py, beside this script; imports torch only when asked)

from tljax import config as config_lib  # noqa: E402
from tljax import data, models  # noqa: E402
from tljax.models import conv  # noqa: E402
from tljax.pretrained.prep import TORCHVISION  # noqa: E402
from tljax.training import mixing, optim, parallel, steps  # noqa: E402

KERAS_MODELS = {"resnet50": "ResNet50", "resnet101": "ResNet101", "resnet152": "ResNet152", "vgg16": "VGG16",
                **{f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)},
                **{f"convnext_{s.lower()}": f"ConvNeXt{s}" for s in ("Tiny", "Small", "Base", "Large", "XLarge")}}
# ViTs compare with keras-hub's ViTBackbone (`pip install keras-hub`, not a tljax dependency), pooled by the class
# token as tljax's: its arguments per model.
KERAS_HUB_VITS = {"vit_small_patch16": {"patch_size": 16, "num_layers": 12, "num_heads": 6, "hidden_dim": 384,
                                        "mlp_dim": 1536},
                  "vit_base_patch16": {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768,
                                       "mlp_dim": 3072}}
CLASSES = 10
# --techniques: phase 2 with these phase fields on, and mixup (alpha 0.2) on its batches.
TECHNIQUES = {"ema_decay": 0.999, "label_smoothing": 0.1, "layer_decay": 0.75}
MIXUP_ALPHA = 0.2


def _random_variables(model: Any, size: int) -> dict:
    """Random variables of the model's shapes without running its initialisers (XLA compiles RNG slowly)."""
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def tljax_steps(name: str, size: int, batch: int, dtype: str, techniques: bool = False,
                xla_options: dict[str, str] | None = None) -> dict[str, tuple[Callable, Any]]:
    """Each phase as (step function, initial carry); calling step(carry) returns the next carry. With `techniques`,
    also "phase2_techniques": phase 2 with `TECHNIQUES` and mixup on; every step compiled with tljax's XLA options
    (`conv.compiler_options`) and `xla_options` over them."""
    model = models.create(name, CLASSES, dtype=dtype)
    variables = jax.device_put(_random_variables(model, size))
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch).astype(np.int32)
    features = jax.jit(functools.partial(model.apply, method="features"))(variables, images[:1])
    batches = {"image": {"image": images, "label": labels},
               "features": {"features": np.repeat(np.asarray(features), batch, 0), "label": labels}}
    micro = parallel.micro_batches(batch)
    out = {}
    evaluate = jax.jit(functools.partial(steps.eval_step, model=model, micro_batches=micro),
                       compiler_options=_options(xla_options))
    eval_batch = {"image": images, "label": labels, "mask": np.ones(batch, np.float32)}
    out["eval"] = (lambda carry: evaluate(variables, eval_batch), None)
    phases = [("phase1", "^head/", False, False), ("phase1_cached", "^head/", True, False),
              ("phase2", ".", False, False)] + ([("phase2_techniques", ".", False, True)] if techniques else [])
    for phase, trainable, on_features, with_techniques in phases:
        fn, state = _phase_step(model, variables, trainable, techniques=with_techniques, on_features=on_features,
                                micro_batches=micro, donate=True, xla_options=xla_options)
        batch_ = batches["features" if on_features else "image"]
        out[phase] = (lambda carry, fn=fn, b=batch_: fn(carry, b)[0], state)
    return out


def _options(extra: dict[str, str] | None) -> dict[str, str]:
    """tljax's XLA options on this backend, with `extra` (--xla-option) over them."""
    return {**conv.compiler_options(), **(extra or {})}


def _phase_step(model: Any, variables: dict, trainable: str, techniques: bool = False, on_features: bool = False,
                micro_batches: int = 1, donate: bool = False, xla_options: dict[str, str] | None = None
                ) -> tuple[Callable, steps.TrainState]:
    """(the jitted train step of a phase that trains `trainable`, its initial state); with `techniques`,
    `TECHNIQUES` and mixup on."""
    cfg = config_lib.phase(trainable=trainable, **(TECHNIQUES if techniques else {}))
    labels_tree = optim.param_labels(variables["params"], trainable)
    tx = optim.build(cfg, labels_tree, 1000, depths=models.layer_depths(model))
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels_tree, bn_train=False,
                                   on_features=on_features, micro_batches=micro_batches,
                                   ema=steps.phase_ema(cfg, 0), label_smoothing=cfg.label_smoothing,
                                   mixing=mixing.Settings(mixup_alpha=MIXUP_ALPHA) if techniques else None),
                 donate_argnums=(0,) if donate else (), compiler_options=_options(xla_options))
    state = steps.create_state(jax.tree.map(np.copy, variables), tx, jax.random.PRNGKey(0), ema=cfg.ema_decay > 0)
    return fn, state


def keras_steps(name: str, size: int, batch: int) -> dict[str, tuple[Callable, Any]]:
    """The same phases in Keras 3: the Applications backbone, global average pooling and a Dense head (a ViT:
    keras-hub's backbone, its class token and a Dense head)."""
    import keras

    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch).astype(np.int32)

    def build(trainable: bool) -> keras.Model:
        # One model per phase: Keras reads `trainable` at every step, so two phases cannot share layers.
        if name in KERAS_HUB_VITS:
            import keras_hub

            base = keras_hub.models.ViTBackbone(image_shape=(size, size, 3), **KERAS_HUB_VITS[name])
        else:
            base = getattr(keras.applications, KERAS_MODELS[name])(include_top=False, weights=None, pooling="avg",
                                                                   input_shape=(size, size, 3))
        base.trainable = trainable
        inputs = keras.Input((size, size, 3))
        pooled = base(inputs, training=False)
        model = keras.Model(inputs, keras.layers.Dense(CLASSES)(pooled[:, 0] if name in KERAS_HUB_VITS else pooled))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=True,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    frozen, unfrozen = build(False), build(True)
    return {"eval": (lambda carry: frozen.predict_on_batch(images), None),
            "phase1": (lambda carry: frozen.train_on_batch(images, labels), None),
            "phase2": (lambda carry: unfrozen.train_on_batch(images, labels), None)}


def pipeline_step(size: int, batch: int, folder: str) -> tuple[Callable, Any]:
    """Batches of the tf.data train pipeline (decode, random-resized crop, flip, normalize) over `folder`."""
    cfg = data.default_config()
    cfg.source, cfg.image_size, cfg.batch_size, cfg.augment = f"folder:{folder}", size, batch, True
    ds = data.build(cfg, TORCHVISION, seed=0)
    state = {"epoch": 0, "it": iter(())}

    def step(carry):
        try:
            return next(state["it"])["image"]
        except StopIteration:
            state["epoch"] += 1
            state["it"] = ds.train(state["epoch"])
            return next(state["it"])["image"]

    return step, None


def write_jpegs(folder: str, count: int = 320, classes: int = 4) -> None:
    """Photo-sized (500x375) JPEGs with some structure, so decoding costs what real photos cost."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(count):
        directory = os.path.join(folder, f"class{i % classes}")
        os.makedirs(directory, exist_ok=True)
        waves = [np.sin(xx / rng.uniform(5, 50) + yy / rng.uniform(5, 50) + c) for c in range(3)]
        pixels = np.stack(waves, -1) * 100 + 128 + rng.normal(0, 20, (375, 500, 3))
        jpeg = tf.io.encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), quality=90)
        tf.io.write_file(os.path.join(directory, f"{i}.jpg"), jpeg)


def _time(fn: Callable, carry: Any, steps_: int) -> tuple[float, Any]:
    start = time.perf_counter()
    for _ in range(steps_):
        carry = fn(carry)
    jax.block_until_ready(carry)
    return time.perf_counter() - start, carry


def measure(systems: dict[str, dict[str, tuple[Callable, Any]]], batch: int, rounds: int, steps_: int) -> dict:
    """Interleaved rounds over every (system, phase); returns medians, ranges, every round's figure and compile
    times."""
    carries = {(s, p): c for s, phases in systems.items() for p, (_, c) in phases.items()}
    compile_s, samples = {}, {key: [] for key in carries}
    for key in carries:  # first call (compilation) and one warm-up call, both excluded
        fn = systems[key[0]][key[1]][0]
        compile_s[key], carries[key] = _time(fn, carries[key], 1)
        _, carries[key] = _time(fn, carries[key], 1)
        print(f"  compiled {key[0]:13s} {key[1]:14s} {compile_s[key]:7.1f} s", file=sys.stderr)
    for r in range(rounds):
        for key in list(carries)[:: 1 if r % 2 == 0 else -1]:  # A B ... B A: a drifting load affects both alike
            n = steps_ * (20 if key[1] in ("pipeline", "phase1_cached") else 1)
            seconds, carries[key] = _time(systems[key[0]][key[1]][0], carries[key], n)
            samples[key].append(n * batch / seconds)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    for (system, phase), values in samples.items():
        results.setdefault(system, {})[phase] = {
            "images_per_s": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": values, "compile_s": compile_s[(system, phase)]}
    return results


def matmul_limit_gflops(dtype: str) -> float:
    """The machine's best dense matmul rate (GFLOP/s) in `dtype`: the ceiling for convolution-heavy models."""
    a = jnp.ones((2048, 2048), models.DTYPES[dtype])
    dot = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    dot(a).block_until_ready()
    best = min(_time(lambda c: dot(a), None, 3)[0] / 3 for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _flops_per_image(name: str, size: int, batch: int, dtype: str, techniques: bool = False) -> dict[str, float]:
    """XLA's own FLOP counts of the compiled eval forward and phase-2 step (and with `techniques`, of the phase-2
    step with them), per image."""
    model = models.create(name, CLASSES, dtype=dtype)
    variables = _random_variables(model, size)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile().cost_analysis()
    flops = {"eval": fwd["flops"] / batch}
    batch_ = {"image": x, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    for phase, with_techniques in (("phase2", False), ("phase2_techniques", True))[: 1 + techniques]:
        fn, state = _phase_step(model, variables, ".", techniques=with_techniques)
        flops[phase] = fn.lower(state, batch_).compile().cost_analysis()["flops"] / batch
    return flops


def _comparisons(text: str) -> tuple[str, ...]:
    """--compare's comma list, checked."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = set(names) - {"keras", "torch"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s) {', '.join(sorted(unknown))}; choose from keras, torch")
    return names


def _xla_option(text: str) -> tuple[str, str]:
    """--xla-option's KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an XLA debug option), got {text!r}")
    return key, value


def main() -> None:
    if "--pipeline" in sys.argv[1:]:  # input pipeline and host-side speed: scripts/pipeline_bench.py's modes
        import pipeline_bench

        pipeline_bench.main([a for a in sys.argv[1:] if a != "--pipeline"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=models.names())
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES))
    parser.add_argument("--compare", type=_comparisons, default=(),
                        help="comma list of systems to time beside tljax: keras, torch (eager and torch.compile)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per measurement (x20 for the fast phases)")
    parser.add_argument("--xla-option", type=_xla_option, action="append", default=[],
                        help="KEY=VALUE, repeatable: also time tljax compiled with these XLA options over its own "
                             "(system tljax_xla, ratios *_xla_vs_tljax), e.g. xla_cpu_scheduler_type="
                             "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--techniques", action="store_true",
                        help=f"also time phase 2 with {TECHNIQUES} and mixup alpha {MIXUP_ALPHA}")
    args = parser.parse_args()

    if "keras" in args.compare and args.model not in KERAS_MODELS and args.model not in KERAS_HUB_VITS:
        parser.error(f"Keras Applications has no {args.model}")
    if "torch" in args.compare and args.model not in torch_bench.ARCHITECTURES:
        parser.error(f"torchvision has no {args.model}; --compare torch supports "
                     f"{', '.join(torch_bench.ARCHITECTURES)}")

    systems = {"tljax": tljax_steps(args.model, args.image_size, args.batch_size, args.dtype, args.techniques)}
    if args.xla_option:
        systems["tljax_xla"] = tljax_steps(args.model, args.image_size, args.batch_size, args.dtype, args.techniques,
                                           dict(args.xla_option))
    folder = tempfile.mkdtemp(prefix="tljax-bench-")
    write_jpegs(folder)
    if "keras" in args.compare:
        systems["keras"] = keras_steps(args.model, args.image_size, args.batch_size)
    if "torch" in args.compare:
        for system in torch_bench.SYSTEMS:
            systems[system] = torch_bench.steps(args.model, args.image_size, args.batch_size, CLASSES,
                                                compiled=system == "torch_compile")
    results = measure(systems, args.batch_size, args.rounds, args.steps)
    # The pipeline's threads keep decoding after its timed batches (prefetch, autotuning) and slowed whatever was
    # timed next by up to 20%: it gets rounds of its own, after the models'.
    pipeline = measure({"tljax": {"pipeline": pipeline_step(args.image_size, args.batch_size, folder)}},
                       args.batch_size, args.rounds, args.steps)
    results["tljax"].update(pipeline["tljax"])

    flops = _flops_per_image(args.model, args.image_size, args.batch_size, args.dtype, args.techniques)
    limit = matmul_limit_gflops(args.dtype)
    ours = {p: v["images_per_s"] for p, v in results["tljax"].items()}
    ratios = {"phase1_vs_phase2": ours["phase1"] / ours["phase2"],
              "pipeline_vs_phase2": ours["pipeline"] / ours["phase2"]}
    if args.techniques:  # each round timed the two steps one after the other: the median of their ratios
        rounds = zip(results["tljax"]["phase2_techniques"]["rounds"], results["tljax"]["phase2"]["rounds"])
        ratios["phase2_techniques_vs_phase2"] = statistics.median(a / b for a, b in rounds)
        ratios["phase2_techniques_flops_vs_phase2"] = flops["phase2_techniques"] / flops["phase2"]
    if "tljax_xla" in results:  # the same phases timed one after the other in each round: medians of the ratios
        for phase, v in results["tljax_xla"].items():
            rounds = zip(v["rounds"], results["tljax"][phase]["rounds"])
            ratios[f"{phase}_xla_vs_tljax"] = statistics.median(a / b for a, b in rounds)
    for other in ("keras", *torch_bench.SYSTEMS):
        if other in results:
            theirs = {p: v["images_per_s"] for p, v in results[other].items()}
            ratios.update({f"eval_vs_{other}": ours["eval"] / theirs["eval"],
                           f"phase1_vs_{other}": ours["phase1"] / theirs["phase1"],
                           f"phase1_cached_vs_{other}_phase1": ours["phase1_cached"] / theirs["phase1"],
                           f"phase2_vs_{other}": ours["phase2"] / theirs["phase2"]})
    setup = {**vars(args), "devices": str(jax.devices()), "flops_per_image": flops, "limit_gflops": limit}
    if "torch" in args.compare:
        setup["torch_threads"] = torch_bench.threads()
        for system in torch_bench.SYSTEMS:
            setup[f"{system}_convolution_share"] = torch_bench.convolution_share(
                args.model, args.image_size, args.batch_size, CLASSES, compiled=system == "torch_compile")
    report = {"setup": setup, **results, "ratios": ratios}

    print(f"\n{args.model} {args.image_size}px batch {args.batch_size} {args.dtype} (images/s, median [min-max]); "
          f"limit: {limit:.0f} GFLOP/s ({args.dtype} matmul on this machine)")
    for system, phases in results.items():
        for phase, v in phases.items():
            gflops = flops.get(phase)
            share = f"  {100 * v['images_per_s'] * gflops / 1e9 / limit:4.1f}% of limit" if gflops else ""
            print(f"  {system:13s} {phase:17s} {v['images_per_s']:9.2f}  [{v['min']:.2f}-{v['max']:.2f}]"
                  f"  compile {v['compile_s']:5.1f} s{share}")
    for name, value in ratios.items():
        print(f"  {name:34s} {value:8.3f}x")
    for system in torch_bench.SYSTEMS:
        for phase, share in setup.get(f"{system}_convolution_share", {}).items():
            print(f"  {system:13s} {phase:6s} {100 * share:5.1f}% of its operation time in convolutions: with kernels "
                  f"no faster, at most {1 / share:.3f}x {system}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
