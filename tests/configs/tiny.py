"""A tiny two-phase run for the training tests: resnet_tiny on a folder of 16x16 images, seconds per phase.

    python -m tljax.main --config=tests/configs/tiny.py:/path/to/folder --workdir=DIR
"""

from tljax import config


def get_config(folder: str = ""):
    cfg = config.defaults()
    cfg.model.name = "resnet_tiny"
    cfg.data.source = f"folder:{folder}"
    cfg.data.image_size = 16
    cfg.data.batch_size = 8
    cfg.data.augment = False
    cfg.data.normalization = "standardize_train"
    cfg.phases = [
        config.phase(name="head", epochs=2, optimizer={"name": "adam", "learning_rate": 1e-2}),
        config.phase(name="all", epochs=2, trainable=".", bn="train",
                     optimizer={"name": "sgd", "learning_rate": 1e-2, "momentum": 0.9}),
    ]
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 3  # two train_step_* points per 6-step epoch
    return cfg
