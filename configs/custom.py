r"""Template: kMaX-DeepLab on your own dataset in the project's format. Copy this file and edit the marked fields.

  python -m panoptic_jax.data.validate data/mine/train            # validate the dataset first
  python -m panoptic_jax.main --config=configs/custom.py --workdir=runs/mine \
      --config.dataset.train=data/mine/train --config.dataset.val=data/mine/val

Categories, colours and which categories are things come from the dataset's metadata.yaml: nothing to set here.
Every field of the base (panoptic_jax/training/config.py, with its default and meaning) can be set here or on the
command line: --config.train.batch_size=16.
"""

from panoptic_jax.training.config import base_config


def get_config():
  config = base_config()
  config.dataset.train = ""  # EDIT: a folder or s3://bucket/prefix holding images/, panoptic_maps/, metadata.yaml.
  config.dataset.val = ""  # EDIT: the held-out split, same format.
  # kmax_r50_coco (output stride 4, 128 slots) suits most photos; kmax_r50_cityscapes (stride 2, 256 slots) suits
  # wide driving scenes with many small instances; kmax_convnext_{t,s,b,l}_coco are stronger and slower.
  config.model.preset = "kmax_r50_coco"
  config.input.crop_size = (641, 641)  # EDIT: 32 * k + 1 per side; about the long image side is a good start.
  config.input.resize_to_crop = True  # Long side to the crop (train: before the random scale); False: pad only.
  config.train.batch_size = 16  # EDIT: global batch over all devices; a multiple of the device count.
  # config.optim.base_lr: the base's 5e-4 is DeepLab2's for batch 64 and a pretrained backbone; try scaling it with
  # the batch, and config.optim.backbone_multiplier = 1.0 for a backbone trained from scratch.
  config.train.steps = 50_000  # EDIT: about 80 epochs is the published budget.
  config.eval.postprocess = "coco"  # Thresholds and area limits tuned for COCO-sized images; "cityscapes", "ade20k".
  return config
