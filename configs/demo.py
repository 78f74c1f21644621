r"""The demo: a small kMaX model on the built-in synthetic street scenes, sized for a 2-core CPU (~13 minutes).

  python -m panoptic_jax.main --config=configs/demo.py --workdir=runs/demo

The synthetic dataset is generated on first use into `dataset.synthetic.cache_dir` (panoptic_jax/data/synthetic.py).
"""

import ml_collections

from panoptic_jax.training.config import base_config


def get_config():
  config = base_config()
  config.dataset.synthetic = ml_collections.ConfigDict(dict(
      cache_dir="~/.cache/panoptic_jax/synthetic", num_train=400,
      num_val=200,  # 50 held only 6 labelled poles: PQ moved by 2 points with the draw.
      height=128, width=256, seed=0))
  config.model.preset = "kmax_small"
  config.input.crop_size = (129, 257)
  config.input.min_scale = 0.75
  config.input.max_scale = 1.25
  config.input.resize_to_crop = False  # Eval pads the 128x256 images into the crop, no resampling.
  config.input.num_workers = 0  # Read in threads of the main process: 2 cores are busy with the model.
  config.loss.instance_sample_k = 512  # A quarter of the demo's 33x65 output pixels.
  # Trained from scratch at batch 8, so a higher rate than DeepLab2's 5e-4 (for batch 64 and a pretrained backbone):
  # runs of 1,000 steps peaked at 1.6e-2 among 2e-3 ... 3.2e-2.
  config.optim.base_lr = 1.6e-2
  config.optim.warmup_steps = 100
  config.optim.backbone_multiplier = 1.0  # No pretrained backbone to protect.
  config.train.batch_size = 8
  config.train.steps = 2000
  config.train.log_every = 25
  config.train.checkpoint_every = 250
  config.train.eval_every = 2000  # Once, at the end (the demo's time budget).
  config.eval.postprocess = "synthetic"
  return config
