"""Time per epoch of K heads trained together on cached features (`tljax.training.heads`), K = 1, 4, 16, 64.

    python scripts/heads_bench.py [--model efficientnet_lite0] [--examples 2000] [--batch 32] [--rounds 5]

Random features of the model's width (EfficientNet-Lite0: 1280) and 10 classes stand in for a cached phase's; each
head has its own learning rate (adam, cosine decay) and weight decay. One epoch = the train batches of `examples`
examples, each put on the device as the feature cache's are and stepped by the vmapped step of all K heads. The K
values are timed in interleaved rounds (after one warm-up epoch each), and the medians are printed with their ratio
to K = 1.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from tljax import config, models
from tljax.training import heads, optim, steps


def _epoch_fn(model: models.Classifier, variables: dict, k: int, phase, total: int):
    """A function that runs one epoch of K heads over the given batches, and the heads' state to start from."""
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, total)
    state = steps.create_state(variables, tx, jax.random.key(0))
    state_axes = heads.axes(state, labels)
    stacked = jax.device_put(heads.stack([state] * k, state_axes))
    values = {"optimizer.learning_rate": np.geomspace(1e-4, 1e-2, k).astype(np.float32),
              "weight_decay": np.geomspace(1e-5, 1e-3, k).astype(np.float32)}
    kwargs = dict(model=model, labels=labels, bn_train=False, on_features=True, micro_batches=1, ema=None,
                  label_smoothing=0.0, mixing=None)
    step = jax.jit(functools.partial(heads.train_step, state_axes=state_axes, phase=phase, phase_steps=total,
                                     depths=None, anchor=None, kwargs=kwargs), donate_argnums=(0,))

    def epoch(state, batches):
        for batch in batches:
            state, sums = step(state, jax.device_put(batch), values)
        jax.block_until_ready(sums)
        return state

    return epoch, stacked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", default="1,4,16,64")
    args = parser.parse_args()
    counts = [int(k) for k in args.heads.split(",")]
    model = models.create(args.model, args.classes)
    variables = jax.device_get(jax.jit(functools.partial(model.init, train=False))(  # host copies: steps donate
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    width = jax.eval_shape(functools.partial(model.apply, method="features"), variables,
                           np.zeros((1, 32, 32, 3), np.float32)).shape[-1]
    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.examples, width)).astype(np.float32)
    targets = rng.integers(0, args.classes, args.examples).astype(np.int32)
    spe = args.examples // args.batch
    batches = [{"features": features[i * args.batch:(i + 1) * args.batch],
                "label": targets[i * args.batch:(i + 1) * args.batch]} for i in range(spe)]
    phase = config.phase(name="head", cache_features=True, weight_decay=1e-4,
                         optimizer={"name": "adam", "learning_rate": 1e-3},
                         schedule={"name": "cosine_decay_schedule", "init_value": "learning_rate",
                                   "decay_steps": "phase_steps"})
    runs = {}
    for k in counts:
        epoch, state = _epoch_fn(model, variables, k, phase, spe)
        runs[k] = [epoch, epoch(state, batches)]  # warm-up epoch: compiles
    times: dict[int, list[float]] = {k: [] for k in counts}
    for _ in range(args.rounds):
        for k in counts:
            start = time.perf_counter()
            runs[k][1] = runs[k][0](runs[k][1], batches)
            times[k].append(time.perf_counter() - start)
    print(f"{args.model} features ({width}), {args.classes} classes, {spe * args.batch} examples, batch "
          f"{args.batch}, {jax.default_backend()} ({jax.device_count()} device(s)); median of {args.rounds} "
          "interleaved rounds")
    base = statistics.median(times[counts[0]])
    for k in counts:
        median = statistics.median(times[k])
        print(f"  K={k:3d}: {median * 1000:8.1f} ms/epoch  {median / base:5.2f}x K={counts[0]}  "
              f"{median * 1000 / k:7.2f} ms per head")


if __name__ == "__main__":
    main()
