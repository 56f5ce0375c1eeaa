"""ViT-B/16 (Google's augreg weights, pretrained on ImageNet-21k) on tf_flowers: big_vision's transfer recipe.

    python -m tljax.main --config=configs/vit.py --workdir=runs/vit

Needs internet once: the weights (`timm/vit_base_patch16_224.augreg_in21k`, ~350 MB, cached in ~/.cache/tljax) and
tf_flowers (~220 MB, into data_dir); without it, pass a local weights file (`--config.model.weights=/path/to/
vit_base_patch16_224.augreg_in21k.safetensors`, or Google's `.npz` of the same checkpoint) and a folder of images
(`--config.data.source=folder:/path/to/flowers`). 3,670 photos of 5 flowers, carved 80/10/10; inputs as the augreg
weights expect them (in [-1, 1], bicubic resize, evaluation crop 0.9).
  * phase 1 "head" (3 epochs): a new 5-way head on the frozen backbone's class token, features cached;
  * phase 2 "finetune" (5 epochs): everything, SGD with momentum 0.9 at 3e-3 after a warm-up, cosine decay,
    gradients clipped to norm 1 (big_vision's fine-tuning settings, its learning rate scaled to batch 32).
Expected: test accuracy around 0.97-0.99. Published references: the keras-io BiT example reports 97.3% on tf_flowers
with BiT-M R50x1, and big_vision reports 99.4% on Flowers102 with ViT-B/32 augreg (not measured on this project's
offline CI machines). ViT-B/16 at 224 px is 17.5 G multiply-adds per image: phase 2 needs an accelerator.
"""

from tljax import config


def get_config():
    cfg = config.defaults()
    cfg.model.name = "vit_base_patch16"
    cfg.model.weights = "timm/vit_base_patch16_224.augreg_in21k"
    cfg.data.source = "tf_flowers"
    cfg.data.download = True
    cfg.data.image_size = 224
    cfg.data.batch_size = 32
    cfg.data.augment = False
    cfg.data.normalization = "pretrained"
    cfg.phases = [
        config.phase(name="head", epochs=3, cache_features=True, optimizer={"name": "adam", "learning_rate": 1e-3}),
        config.phase(name="finetune", epochs=5, trainable=".", clip_grad_norm=1.0,
                     optimizer={"name": "sgd", "learning_rate": 3e-3, "momentum": 0.9},
                     schedule={"name": "warmup_cosine_decay_schedule", "init_value": 0.0,
                               "peak_value": "learning_rate", "warmup_steps": 100, "decay_steps": "phase_steps"}),
    ]
    return cfg
