r"""kMaX-DeepLab ResNet-50 on Cityscapes: DeepLab2's published recipe (64.3 PQ on val).

  python -m panoptic_jax.data.convert cityscapes --root CITYSCAPES --split train \
      --out data/cityscapes/train  # and --split val
  python -m panoptic_jax.main --config=configs/cityscapes.py --workdir=runs/cityscapes_r50 \
      --config.dataset.train=data/cityscapes/train --config.dataset.val=data/cityscapes/val

The backbone starts from ImageNet: `weights/R-50.pkl` is the ResNet-50 that the authors' PyTorch port starts from
(torchvision's weights in detectron2's names; README, "Start from published weights", says where to get it). A run
with the file missing stops before building anything; `--config.model.init_from=''` trains from scratch instead.

Panoptic copy-paste of a second training image is part of the recipe (DeepLab2's and the PyTorch port's;
panoptic_jax/data/transforms.py): `--config.input.copy_paste=False` turns it off.

The base (panoptic_jax/training/config.py) holds the losses and the optimiser of the recipe; this file what is
specific to Cityscapes.
"""

from panoptic_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model.preset = "kmax_r50_cityscapes"  # Output stride 2, 256 mask slots.
  config.model.init_from = "weights/R-50.pkl"  # ImageNet ResNet-50 (torchvision, detectron2 names).
  config.input.copy_paste = True
  # DeepLab2's photometric augmentation: its AutoAugment policy, no colour jitter (panoptic_jax/data/autoaugment.py).
  config.input.autoaugment = "simple_classification_policy_magnitude_scale_0.2"
  config.input.brightness = config.input.contrast = config.input.saturation = config.input.hue = 0.0
  config.input.crop_size = (1025, 2049)
  config.input.min_scale = 0.5
  config.input.max_scale = 2.0
  config.input.resize_to_crop = False  # Images are scaled only by the random scale; eval pads 1024x2048.
  config.loss.instance_temperature = 0.6
  config.loss.semantic_topk = 0.2  # Hard-pixel mining: the top 20% of the pixel losses.
  config.optim.base_lr = 3e-4
  config.train.batch_size = 32
  config.train.steps = 60_000
  config.eval.batch_size = 4
  config.eval.postprocess = "cityscapes"
  return config
