"""Sweeps: variants of one config, each an ordinary run, and the phases they can share.

A sweep is a list of overrides, one dict per variant, applied to a copy of the config (after its command-line
overrides):

    {"phases[1].optimizer.learning_rate": 1e-4, "phases[1].schedule.name": "constant"}

They come from a sweep file whose `get_sweep()` returns the list (`product` makes a grid in one line) and from
`--grid 'path=v1,v2,...'` flags, whose strings are parsed as `--config.path=v` would be. A path must name an
existing field, and a value must fit the field's type by ml_collections' rules (as for command-line overrides);
each variant is named from its overrides (`name`: `lr1e-4_sched-constant`), and two variants may not share a name.

Variants that agree on everything the first k phases depend on (`checkpoint.trained_fields`: the model, data and
seed, those phases' fields, whether any phase uses L2-SP) train those phases once: `plan` gives each variant the
deepest such prefix it shares with another variant, keyed by a hash of those fields.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import re
from typing import Any, Collection, Mapping, Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from tljax import data
from tljax.training import checkpoint

# Short names of the fields swept most often, for variant names; any other field goes by its last component.
_SHORT = {"learning_rate": "lr", "schedule": "sched", "optimizer": "opt", "weight_decay": "wd", "epochs": "ep",
          "label_smoothing": "ls", "ema_decay": "ema", "layer_decay": "ld", "batch_size": "bs", "image_size": "px",
          "trainable": "train", "backbone_lr_multiplier": "bblr", "clip_grad_norm": "clip", "dropout": "drop",
          "mixup_alpha": "mixup", "cutmix_alpha": "cutmix"}
_MAX_NAME = 100  # longer names end in a hash of the overrides instead


class SweepError(data.ConfigError):
    """A sweep that cannot run as given (a field that does not exist, a value of the wrong type, an empty grid, two
    variants with one name, a bad shard), refused before anything trains."""


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest:
    `product({"a": (1, 2), "b": ("x", "y")})` -> `[{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, ...]`.
    """
    for path, values in axes.items():
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence) or not values:
            raise SweepError(f"the axis {path!r} needs a non-empty list of values, not {values!r}")
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def combine(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The product of several lists of overrides (a sweep file's and the grids'): every combination of one dict from
    each; a path that two of them set is refused, as it would be ambiguous."""
    out: list[dict[str, Any]] = [{}]
    for sweep in sweeps:
        merged = []
        for left, right in itertools.product(out, sweep):
            both = sorted(left.keys() & right.keys())
            if both:
                raise SweepError(f"{both[0]} is swept twice (by the sweep file and a --grid, or by two --grid flags): "
                                 "sweep it once")
            merged.append({**left, **right})
        out = merged
    return out


def load(path: str) -> list[dict[str, Any]]:
    """The overrides of sweep file `path`: its `get_sweep()`, a non-empty list of dicts of field paths."""
    spec = importlib.util.spec_from_file_location("tljax_sweep_file", path)
    if spec is None or spec.loader is None:
        raise SweepError(f"cannot load sweep file {path!r}: give a Python file defining get_sweep()")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise SweepError(f"sweep file {path!r} does not exist") from None
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"sweep file {path!r} defines no get_sweep()")
    sweep = module.get_sweep()
    if not isinstance(sweep, list) or not sweep or not all(
            isinstance(o, dict) and all(isinstance(k, str) for k in o) for o in sweep):
        raise SweepError(f"get_sweep() of {path!r} must return a non-empty list of dicts {{field path: value}}, "
                         f"not {sweep!r}")
    return sweep


def _split_values(text: str) -> list[str]:
    """`text` split at its commas outside brackets and quotes: "1e-4,3e-4" -> ["1e-4", "3e-4"];
    "(1, 2),(3,)" -> ["(1, 2)", "(3,)"]."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [part.strip() for part in parts + [text[start:]]]


def grid(text: str, base: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """A `--grid` flag, "path=v1,v2,...", as {path: [values]}, each string parsed as `--config.path=v` would be
    (by the field's type in `base`)."""
    path, sep, values = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise SweepError(f"--grid {text!r}: write 'field.path=value1,value2,...'")
    strings = [s for s in _split_values(values) if s]
    if not strings:
        raise SweepError(f"--grid {text!r}: the grid of {path} is empty; give at least one value")
    _check_path(path, base, f"--grid {text!r}")
    return {path: [_parse(path, s, base) for s in strings]}


def _parse(path: str, text: str, base: ml_collections.ConfigDict) -> Any:
    """`text` as the value of field `path`, parsed by ml_collections' command-line parser for the field's type."""
    argv = ["tljax.sweep", f"--config.{path}={text}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", copy.deepcopy(base), flag_values=values, sys_argv=argv,
                                    lock_config=True)
    try:
        values(argv)
    except flags.Error as e:
        raise SweepError(f"--grid {path}: {text!r} is not a value for this field: {e}") from None
    return config_path.get_value(path, values["config"].value)


def _check_path(path: str, base: ml_collections.ConfigDict, where: str) -> None:
    """Raises SweepError unless `path` names a field of `base`, suggesting the closest one."""
    try:
        config_path.get_value(path, base)
        return
    except (KeyError, IndexError, AttributeError, ValueError):
        pass
    hint = difflib.get_close_matches(path, list(checkpoint.fields(base)), n=1)
    raise SweepError(f"{where}: {path} is not a config field" + (f" (did you mean {hint[0]}?)" if hint else ""))


def _label_float(value: float) -> str:
    """From 0.01 to 1e5 as written (0.5, 3), other values as 1e-4, 2.5e-5, 1e+38: short and unique (the shortest
    repr's digits)."""
    if value != 0 and not 0.01 <= abs(value) < 1e5:
        return np.format_float_scientific(value, trim="-", exp_digits=1)
    return np.format_float_positional(value, trim="-")


def label(value: Any) -> str:
    """A value as it appears in a variant's name and in the comparison (optax schedules without "_schedule")."""
    if isinstance(value, float):
        return _label_float(value)
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, str):
        return value.removesuffix("_schedule")
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"))


def _key_labels(paths: Collection[str]) -> dict[str, str]:
    """Each swept path's part of a name: its last field's short name ("lr" for *.learning_rate, "sched" for
    *.schedule.name), prefixed by the phase ("p1lr") where two paths would get the same, the full path where that
    does not tell them apart either."""
    def short(path: str) -> str:
        parts = re.sub(r"\[\d+\]", "", path).split(".")
        last = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
        return _SHORT.get(last, last)

    def unique(labels: dict[str, str], better) -> dict[str, str]:
        taken = list(labels.values())
        return {path: better(path) if taken.count(text) > 1 else text for path, text in labels.items()}

    labels = unique({path: short(path) for path in paths},
                    lambda path: f"p{checkpoint.phase_of(path)}{short(path)}" if checkpoint.phase_of(path) is not None
                    else path)
    return unique(labels, lambda path: path)


def name(overrides: Mapping[str, Any], keys: Mapping[str, str]) -> str:
    """A variant's directory name: its overrides' labels joined by "_" ("base" for none), numbers right after the
    key ("lr1e-4"), other values after a dash ("sched-cosine_decay"), characters other than letters, digits and
    ".+-" as "_"; names over 100 characters end in a hash of the overrides."""
    parts = []
    for path, value in overrides.items():
        text = label(value)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        parts.append(keys[path] + ("" if numeric else "-") + text)
    result = re.sub(r"[^A-Za-z0-9.+\-]+", "_", "_".join(parts)).strip("_.") or "base"
    if len(result) > _MAX_NAME:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
        result = f"{result[:_MAX_NAME - 9]}-{digest}"
    return result


@dataclasses.dataclass(frozen=True)
class Variant:
    """One run of a sweep: its name (its directory under the sweep's workdir), overrides and config."""

    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict


def _overlaps(a: str, b: str) -> bool:
    """Whether field paths a and b set the same field or one holds the other ("phases[1].schedule" and
    "phases[1].schedule.name")."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith(short + ".") or long.startswith(short + "[")


def variants(base: ml_collections.ConfigDict, sweep: Sequence[Mapping[str, Any]],
             fixed: Collection[str] = ()) -> list[Variant]:
    """Each override dict of `sweep` applied to a copy of `base`, named (`name`).

    fixed: the fields the command line set for every variant; a sweep may not set them too. Raises SweepError
    naming the override for a field that does not exist or a value of the wrong type, and for two variants with
    one name. The configs are not validated here: a variant whose values `config.validate` refuses fails on its
    own when it runs, and the others run.
    """
    paths = list(dict.fromkeys(path for overrides in sweep for path in overrides))
    for path in paths:
        _check_path(path, base, "sweep")
        clash = next((f for f in fixed if _overlaps(f, path)), None)
        if clash is not None:
            raise SweepError(f"{path} is swept and also set by --config.{clash}: remove one of them")
    keys, out, names = _key_labels(paths), [], {}
    for overrides in sweep:
        variant_name = name(overrides, keys)
        if variant_name in names:
            raise SweepError(f"two variants are both named {variant_name!r}: {names[variant_name]} and "
                             f"{dict(overrides)}; give each variant different values")
        names[variant_name] = dict(overrides)
        cfg = copy.deepcopy(base)
        for path, value in overrides.items():
            try:
                config_path.set_value(path, cfg, value)
            except TypeError as e:
                raise SweepError(f"variant {variant_name}: {path}={value!r}: {e}") from None
        out.append(Variant(variant_name, dict(overrides), cfg))
    return out


def shard(text: str) -> tuple[int, int]:
    """`--variant_shard` "i/n" as (i, n): this job runs variants i, i + n, i + 2n, ... (0 <= i < n)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise SweepError(f"--variant_shard={text!r}: write i/n with 0 <= i < n (job i of n; e.g. 0/2 and 1/2)")
    return int(match.group(1)), int(match.group(2))


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Phases 0..phases-1 shared by the variants `members`: trained once, in `_shared/<key>/`, with the first
    member's config (its later phases are not trained there), starting from a copy of `parent`'s checkpoint when
    a shorter prefix is shared by more variants."""

    key: str
    phases: int
    members: tuple[str, ...]
    config: ml_collections.ConfigDict
    parent: Prefix | None


def prefix_key(config: ml_collections.ConfigDict, phases: int) -> str:
    """A hash of everything training the first `phases` phases of `config` depends on (`checkpoint.trained_fields`)."""
    fields = {"shared_phases": phases, **checkpoint.trained_fields(config, phases)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def plan(runs: Sequence[Variant]) -> dict[str, Prefix | None]:
    """Each variant's deepest shared prefix (None: it shares no phase with another variant).

    A variant of K phases shares its first k < K phases (its last phase always trains in its own workdir) with
    the variants whose `prefix_key(., k)` equals its own; k is as large as such a variant exists, so the variants
    of a group part where their configs first differ. Prefixes nest: a longer prefix starts from the shorter one
    that more variants share.
    """
    keys = {(v.name, k): prefix_key(v.config, k) for v in runs for k in range(1, len(v.config.phases))}
    prefixes: dict[str, Prefix] = {}
    deepest: dict[str, Prefix | None] = {}
    for v in runs:
        chain: list[tuple[int, tuple[str, ...]]] = []
        for k in range(1, len(v.config.phases)):
            members = tuple(w.name for w in runs if keys.get((w.name, k)) == keys[v.name, k])
            if len(members) < 2:
                break
            if chain and chain[-1][1] == members:
                chain[-1] = (k, members)  # the same group shares one more phase
            else:
                chain.append((k, members))
        parent = None
        for k, members in chain:
            key = keys[v.name, k]
            if key not in prefixes:
                first = next(w for w in runs if w.name == members[0])
                prefixes[key] = Prefix(key, k, members, first.config, parent)
            parent = prefixes[key]
        deepest[v.name] = parent
    return deepest
