r"""kMaX-DeepLab ResNet-50 on Cityscapes: DeepLab2's published recipe (64.3 PQ on val).

  python -m panoptic_jax.data.convert cityscapes --root CITYSCAPES --split train \
      --out data/cityscapes/train  # and --split val
  python -m panoptic_jax.main --config=configs/cityscapes.py --workdir=runs/cityscapes_r50 \
      --config.dataset.train=data/cityscapes/train --config.dataset.val=data/cityscapes/val
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
  config.model.preset = "kmax_r50_cityscapes"  # Architecture numbers live in panoptic_jax/model/kmax_deeplab.py.
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 parameters.
  config.model.remat = False  # Recompute activations per stage in the backward pass (less memory, ~30% slower).

  config.input = ml_collections.ConfigDict()
  config.input.crop_size = (1025, 2049)
  config.input.min_scale = 0.5
  config.input.max_scale = 2.0
  config.input.resize_to_crop = False  # Images are scaled only by the random scale; eval pads 1024x2048.
  config.input.num_workers = 8
  config.input.max_skipped_fraction = 0.01  # Undecodable samples are skipped; past this share (and 10) training stops.

  config.loss = ml_collections.ConfigDict()
  config.loss.pq_weight = 3.0
  config.loss.mask_id_weight = 0.3
  config.loss.instance_weight = 1.0
  config.loss.semantic_weight = 1.0
  config.loss.instance_temperature = 0.6
  config.loss.instance_sample_k = 4096
  config.loss.semantic_topk = 0.2  # Hard-pixel mining: the top 20% of the pixel losses.

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 3e-4
  config.optim.warmup_steps = 5000
  config.optim.poly_power = 0.9
  config.optim.weight_decay = 0.05
  config.optim.backbone_multiplier = 0.1
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-7

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32
  config.train.steps = 60_000
  config.train.log_every = 100
  config.train.checkpoint_every = 2000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 4
  config.eval.postprocess = "cityscapes"  # Thresholds and area limits: panoptic_jax/inference/postprocess.py.
  config.eval.max_images = 0  # 0 = the whole validation set.
  config.eval.num_visualizations = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: the devices that remain after the other axes.
  config.mesh.fsdp = 1
  return config
