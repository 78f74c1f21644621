r"""Fine-tuning on Cityscapes from the authors' released COCO model (kMaX-DeepLab R50, 53.3 PQ on COCO val).

  python -m panoptic_jax.main --config=configs/finetune_cityscapes_from_coco.py --workdir=runs/cityscapes_from_coco \
      --config.dataset.train=data/cityscapes/train --config.dataset.val=data/cityscapes/val

The whole COCO model is imported (`weights/kmax_r50_coco.pth`: the port's released checkpoint; README, "Start from
published weights"): the architecture stays COCO's (output stride 4, 128 mask slots), so every tensor has its place.
The class heads keep the rows of the Cityscapes categories that COCO names the same way (person, car, truck, bus,
train, motorcycle, bicycle, traffic light, road, ...), and the other categories start from their initialisation; the
report in the workdir (init_from.json) lists which. The rest of the recipe is Cityscapes' (crops, scales, losses),
for a quarter of its steps. This config has not been run to convergence here (no accelerator): its PQ is not
measured.
"""

from configs import cityscapes


def get_config():
  config = cityscapes.get_config()
  config.model.preset = "kmax_r50_coco"
  config.model.init_from = "weights/kmax_r50_coco.pth"
  config.train.steps = 15_000
  config.optim.warmup_steps = 1000
  return config
