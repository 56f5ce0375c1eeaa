"""ResNet-50 (timm `resnet50.a1_in1k`, ImageNet top-1 81.2%) on tf_flowers: the classic transfer-learning recipe.

    python -m tljax.main --config=configs/resnet.py --workdir=runs/resnet

Needs internet once: the weights (~100 MB, cached in ~/.cache/tljax) and tf_flowers (~220 MB, into data_dir);
without it, pass a local weights file (`--config.model.weights=/path/resnet50.safetensors`) and a folder of images
(`--config.data.source=folder:/path/to/flowers`). 3,670 photos of 5 flowers, carved 80/10/10.
  * phase 1 "head" (5 epochs): a new 5-way head on the frozen backbone, features cached (the backbone runs once);
  * phase 2 "finetune" (5 epochs): everything, Adam at 1e-5 after a short warm-up, cosine decay, backbone
    BatchNorm kept in inference mode (the Keras transfer-learning guide's advice).
Expected: validation accuracy around 0.9 after phase 1 and a little higher after phase 2 (not measured on this
project's offline CI machines; the offline quickstart is). On 2 CPU cores phase 2 takes hours: use an accelerator.
"""

from tljax import config


def get_config():
    cfg = config.defaults()
    cfg.model.name = "resnet50"
    cfg.model.weights = "timm/resnet50.a1_in1k"
    cfg.data.source = "tf_flowers"
    cfg.data.download = True
    cfg.data.image_size = 224
    cfg.data.batch_size = 32
    cfg.data.augment = False
    cfg.data.normalization = "pretrained"
    cfg.phases = [
        config.phase(name="head", epochs=5, cache_features=True, optimizer={"name": "adam", "learning_rate": 1e-3}),
        config.phase(name="finetune", epochs=5, trainable=".",
                     optimizer={"name": "adam", "learning_rate": 1e-5},
                     schedule={"name": "warmup_cosine_decay_schedule", "init_value": 0.0,
                               "peak_value": "learning_rate", "warmup_steps": 50, "decay_steps": "phase_steps"}),
    ]
    return cfg
