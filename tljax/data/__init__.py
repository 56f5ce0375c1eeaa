"""The input side: sources -> normalize -> batch, all in tf.data before batches reach the device.

    cfg = data.default_config()                       # config.data: every field with its default
    ds = data.build(cfg, prep, seed=0, workdir="runs/x", num_devices=jax.device_count(),
                    process_index=jax.process_index(), process_count=jax.process_count())
    for batch in ds.train(epoch, start_step):         # {"image": f32 [L,H,W,3] normalised, "label": i32 [L]}
        ...
    for batch in ds.eval("val"):                      # + "mask": f32 [L], 0 on padding
        ...

`options` holds config.data's defaults and checks; `sources` reads tfds names, image folders and the offline
animal_mnist set; `normalize` holds the normalization strategies and the training statistics; `transforms` the
per-image tf ops, `randaugment` RandAugment's; `pipeline` orders, shards and batches.
"""

from tljax.data.normalize import STRATEGIES, Stats
from tljax.data.options import ConfigError, check_config, check_number, default_config
from tljax.data.pipeline import CorruptImageError, InputPipeline, build
from tljax.data.sources import SourceError

__all__ = ["STRATEGIES", "ConfigError", "CorruptImageError", "InputPipeline", "SourceError", "Stats", "build",
           "check_config", "check_number", "default_config"]
