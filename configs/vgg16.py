"""VGG16 (Keras Applications ImageNet weights) on a folder of your own images, Keras-guide style.

    python -m tljax.main --config=configs/vgg16.py --workdir=runs/vgg16 --config.data.source=folder:/path/to/images

`/path/to/images` holds one subfolder per class (or train/val/test folders of those). The weights (~530 MB with the
ImageNet classifier, of which the 512-wide global-pooled backbone is kept) download once from Keras's storage.
Keras "caffe" preprocessing (BGR, mean subtraction) is applied in the input pipeline.
  * phase 1 "head" (10 epochs): global average pooling -> dropout 0.3 -> 256 ReLU -> dropout -> classes;
  * phase 2 "finetune" (5 epochs): block 5 and the head at 1e-5 with SGD + momentum.
Expected: depends on your data; on small photo data sets VGG16 features typically reach within a few points of
ResNet-50's.
"""

from tljax import config


def get_config():
    cfg = config.defaults()
    cfg.model.name = "vgg16"
    cfg.model.weights = "keras/vgg16"
    cfg.model.head.hidden = (256,)
    cfg.model.head.dropout = 0.3
    cfg.data.source = "folder:images"
    cfg.data.image_size = 224
    cfg.data.batch_size = 32
    cfg.data.augment = False
    cfg.phases = [
        config.phase(name="head", epochs=10, cache_features=True, optimizer={"name": "adam", "learning_rate": 1e-3}),
        config.phase(name="finetune", epochs=5, trainable="block5|^head/",
                     optimizer={"name": "sgd", "learning_rate": 1e-5, "momentum": 0.9}),
    ]
    return cfg
