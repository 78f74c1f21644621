r"""kMaX-DeepLab ResNet-50 on COCO panoptic: DeepLab2's published recipe (53.0 PQ on val).

  python -m panoptic_jax.data.convert coco ... --out data/coco/train   # and val (see README)
  python -m panoptic_jax.main --config=configs/coco.py --workdir=runs/coco_r50 \
      --config.dataset.train=data/coco/train --config.dataset.val=data/coco/val
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Datasets in the project's format: local folders or s3://bucket/prefix (endpoint from --config.dataset.endpoint_url
  # or AWS_ENDPOINT_URL_S3; credentials from the AWS chain).
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = ""
  config.dataset.val = ""
  config.dataset.endpoint_url = ""
  config.dataset.synthetic = None  # Only the demo generates its data.

  config.model = ml_collections.ConfigDict()
  config.model.preset = "kmax_r50_coco"  # Architecture numbers live in panoptic_jax/model/kmax_deeplab.py.
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 parameters.
  config.model.remat = False  # Recompute activations per stage in the backward pass (less memory, ~30% slower).

  config.input = ml_collections.ConfigDict()
  config.input.crop_size = (1281, 1281)
  config.input.min_scale = 0.3
  config.input.max_scale = 1.7
  config.input.resize_to_crop = True  # COCO recipe: the long side is resized to the crop (train and eval).
  config.input.num_workers = 8
  config.input.max_skipped_fraction = 0.01  # Undecodable samples are skipped; past this share (and 10) training stops.

  config.loss = ml_collections.ConfigDict()
  config.loss.pq_weight = 3.0
  config.loss.mask_id_weight = 0.3
  config.loss.instance_weight = 1.0
  config.loss.semantic_weight = 1.0
  config.loss.instance_temperature = 1.5
  config.loss.instance_sample_k = 4096
  config.loss.semantic_topk = 1.0

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 5e-4
  config.optim.warmup_steps = 5000
  config.optim.poly_power = 0.9
  config.optim.weight_decay = 0.05
  config.optim.backbone_multiplier = 0.1
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-7

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64
  config.train.steps = 150_000
  config.train.log_every = 100
  config.train.checkpoint_every = 2000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 10_000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8
  config.eval.postprocess = "coco"  # Thresholds and area limits: panoptic_jax/inference/postprocess.py.
  config.eval.max_images = 0  # 0 = the whole validation set.
  config.eval.num_visualizations = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: the devices that remain after the other axes.
  config.mesh.fsdp = 1
  return config
