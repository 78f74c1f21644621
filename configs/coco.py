r"""kMaX-DeepLab ResNet-50 on COCO panoptic: DeepLab2's published recipe (53.0 PQ on val).

  python -m panoptic_jax.data.convert coco ... --out data/coco/train   # and val (see README)
  python -m panoptic_jax.main --config=configs/coco.py --workdir=runs/coco_r50 \
      --config.dataset.train=data/coco/train --config.dataset.val=data/coco/val

The backbone starts from ImageNet: `weights/R-50.pkl` is the ResNet-50 that the authors' PyTorch port starts from
(torchvision's weights in detectron2's names; README, "Start from published weights", says where to get it). A run
with the file missing stops before building anything; `--config.model.init_from=''` trains from scratch instead.

Panoptic copy-paste of a second training image is part of the recipe (DeepLab2's and the PyTorch port's;
panoptic_jax/data/transforms.py): `--config.input.copy_paste=False` turns it off.

Memory: bf16 compute (float32 parameters) and rematerialised stages, so that the published batch fits the cheapest
slice, a v5e-8 (8 images per chip): `python -m panoptic_jax.plan --config=configs/coco.py --topology=v5e-8` plans
14.33 GiB per chip of the 15.75 GiB usable; float32 without remat needs 57.8 GiB per chip (BENCHMARKS.md, "Memory
plan"). On chips with more memory `--config.model.remat=False` trains faster.

The base (panoptic_jax/training/config.py) holds the losses and the optimiser of the recipe; this file what is
specific to COCO.
"""

from panoptic_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model.preset = "kmax_r50_coco"
  config.model.init_from = "weights/R-50.pkl"  # ImageNet ResNet-50 (torchvision, detectron2 names).
  config.input.copy_paste = True
  # DeepLab2's photometric augmentation: its AutoAugment policy, no colour jitter (panoptic_jax/data/autoaugment.py).
  config.input.autoaugment = "simple_classification_policy"
  config.input.brightness = config.input.contrast = config.input.saturation = config.input.hue = 0.0
  config.input.crop_size = (1281, 1281)
  config.input.min_scale = 0.3
  config.input.max_scale = 1.7
  config.input.resize_to_crop = True  # The long side is resized to the crop (train and eval).
  config.train.batch_size = 64
  config.model.dtype = "bfloat16"
  config.model.remat = True
  config.train.steps = 150_000
  config.train.eval_every = 10_000
  config.eval.postprocess = "coco"
  return config
