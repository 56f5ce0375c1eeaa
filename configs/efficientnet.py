"""EfficientNet-B0 (torchvision `IMAGENET1K_V1`, ImageNet top-1 77.7%) on tf_flowers, with augmentation.

    python -m tljax.main --config=configs/efficientnet.py --workdir=runs/efficientnet

Needs internet once for the weights (~21 MB) and tf_flowers (see configs/resnet.py for the offline alternatives).
Augmentation (random-resized crop + flip) is on, so phase 1 runs the frozen backbone every step instead of caching
its features.
  * phase 1 "head" (3 epochs): new head, backbone frozen (its backward pass is never computed);
  * phase 2 "finetune" (5 epochs): the last two stages and the head at 1e-4 (the backbone at 0.1x of that),
    gradient clipping at 1.0, BatchNorm in inference mode.
Expected: validation accuracy around 0.9 (not measured on this project's offline machines).
"""

from tljax import config


def get_config():
    cfg = config.defaults()
    cfg.model.name = "efficientnet_b0"
    cfg.model.weights = "torchvision/efficientnet_b0.IMAGENET1K_V1"
    cfg.data.source = "tf_flowers"
    cfg.data.download = True
    cfg.data.image_size = 224
    cfg.data.batch_size = 32
    cfg.data.augment = True
    cfg.data.crop_scale = (0.25, 1.0)
    cfg.phases = [
        config.phase(name="head", epochs=3, optimizer={"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}),
        config.phase(name="finetune", epochs=5, trainable="stage6|stage7|head_conv|head_bn|^head/",
                     backbone_lr_multiplier=0.1, clip_grad_norm=1.0,
                     optimizer={"name": "adamw", "learning_rate": 1e-4, "weight_decay": 1e-4},
                     schedule={"name": "cosine_decay_schedule", "init_value": "learning_rate",
                               "decay_steps": "phase_steps"}),
    ]
    return cfg
