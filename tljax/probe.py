"""`python -m tljax.probe --weights=NAME,... --workdir=DIR [--data=animal_mnist] [--shots=1,5,10,25] [--seeds=3]`:
compare backbones before fine-tuning, by linear probes on their frozen features.

Each backbone (a known weight name such as wheel/efficientnet_lite0, MODEL:FILE, or none:MODEL for random weights)
computes its features of the train, val and test splits once; then, for each shot count and seed, a closed-form
ridge probe (`tljax.research.fewshot`, big_vision's few-shot linear regression) is fitted on that many training
examples per class, its L2 strength chosen on the validation split, and scored on the test split; a last probe uses
every training example. Writes DIR/probe.json, probe.csv and probe.png (accuracy against shots) and prints a table.
Every flag, the weight names and the shot counts against the data's smallest class are checked before any feature is
computed.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

from absl import app, flags

from tljax import cli
from tljax.research import fewshot, probing

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a program."""
    flags.DEFINE_string("weights", None, "Comma-separated backbones: known weight names (their model is known), "
                        "MODEL:WEIGHTS for a file, none:MODEL for random weights.")
    flags.DEFINE_string("workdir", None, "Where probe.json, probe.csv and probe.png are written.")
    flags.DEFINE_string("data", "animal_mnist", "A tfds name, animal_mnist, or folder:/path.")
    flags.DEFINE_string("data_dir", "", "tfds data_dir ('' = tfds's default).")
    flags.DEFINE_string("shots", "1,5,10,25", "Comma-separated training examples per class.")
    flags.DEFINE_integer("seeds", 3, "Draws of the few-shot training examples per shot count (seeds 0..N-1).")
    flags.DEFINE_integer("image_size", 0, "Input resolution (0 = each backbone's weights' own; random: 224).")
    flags.DEFINE_string("train_split", "", "Split strings, as config.data takes them ('' = the source's own, or "
                        "carved from train).")
    flags.DEFINE_string("val_split", "", "The split the L2 strength is chosen on.")
    flags.DEFINE_string("test_split", "", "The split the probes are scored on.")
    flags.DEFINE_integer("batch_size", 32, "Images per backbone pass.")
    flags.DEFINE_integer("seed", 0, "Initialisation of the random-weight (none:MODEL) backbones.")
    flags.DEFINE_string("l2_grid", ",".join(f"{v:g}" for v in fewshot.L2_GRID),
                        "Comma-separated L2 strengths to choose from on the validation split.")
    flags.mark_flags_as_required(["weights", "workdir"])


def _l2_grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise probing.ProbeError(f"--l2_grid {text!r}: expected comma-separated numbers") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    settings = probing.Settings(
        backbones=probing.parse_backbones(FLAGS.weights), data=FLAGS.data, data_dir=FLAGS.data_dir,
        shots=probing.parse_ints(FLAGS.shots, "--shots"), seeds=FLAGS.seeds, image_size=FLAGS.image_size,
        train_split=FLAGS.train_split, val_split=FLAGS.val_split, test_split=FLAGS.test_split,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, l2_grid=_l2_grid(FLAGS.l2_grid))
    result = probing.run(settings)
    paths = probing.write(result, FLAGS.workdir)
    splits = result.setup["data"]["splits"]
    print(f"{result.setup['data']['source']}: test accuracy of linear probes ({settings.seeds} seeds, L2 chosen on "
          f"{splits['val']['split']}, scored on {splits['test']['split']}, {splits['test']['examples']} examples)")
    print(probing.table(result.rows))
    print(f"written to {', '.join(paths)}")


if __name__ == "__main__":
    _define_flags()
    app.run(cli.command(main, probing.ProbeError))
