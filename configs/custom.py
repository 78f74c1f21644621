r"""Template: kMaX-DeepLab on your own dataset in the project's format. Copy this file and edit the marked fields.

  python -m panoptic_jax.data.validate data/mine/train            # validate the dataset first
  python -m panoptic_jax.main --config=configs/custom.py --workdir=runs/mine \
      --config.dataset.train=data/mine/train --config.dataset.val=data/mine/val

Categories, colours and which categories are things come from the dataset's metadata.yaml: nothing to set here.
Every field can be overridden on the command line: --config.train.batch_size=16.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = ""  # EDIT: a folder or s3://bucket/prefix holding images/, panoptic_maps/, metadata.yaml.
  config.dataset.val = ""  # EDIT: the held-out split, same format.
  config.dataset.endpoint_url = ""  # For S3-compatible stores other than AWS (or set AWS_ENDPOINT_URL_S3).
  config.dataset.synthetic = None

  config.model = ml_collections.ConfigDict()
  # kmax_r50_coco (output stride 4, 128 slots) suits most photos; kmax_r50_cityscapes (stride 2, 256 slots) suits
  # wide driving scenes with many small instances; kmax_convnext_{t,s,b,l}_coco are stronger and slower.
  config.model.preset = "kmax_r50_coco"
  config.model.dtype = "float32"  # "bfloat16" halves activation memory on TPU / recent GPUs.
  config.model.remat = False  # True if the step runs out of memory.

  config.input = ml_collections.ConfigDict()
  config.input.crop_size = (641, 641)  # EDIT: output_stride * k + 1; the long image side is a good start.
  config.input.min_scale = 0.5
  config.input.max_scale = 2.0
  config.input.resize_to_crop = True  # Long side to the crop (train: before the random scale); False: pad only.
  config.input.num_workers = 8  # Worker processes decoding and augmenting; about the number of host cores.
  config.input.max_skipped_fraction = 0.01  # Undecodable samples are skipped; past this share (and 10) training stops.

  config.loss = ml_collections.ConfigDict()
  config.loss.pq_weight = 3.0
  config.loss.mask_id_weight = 0.3
  config.loss.instance_weight = 1.0
  config.loss.semantic_weight = 1.0
  config.loss.instance_temperature = 1.5
  config.loss.instance_sample_k = 4096
  config.loss.semantic_topk = 1.0  # < 1 mines the hardest pixels (Cityscapes uses 0.2).

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 5e-4  # For batch 64; scale linearly with the batch size.
  config.optim.warmup_steps = 5000
  config.optim.poly_power = 0.9
  config.optim.weight_decay = 0.05
  config.optim.backbone_multiplier = 0.1  # 1.0 when the backbone starts from scratch.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-7

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # EDIT: global batch over all devices; a multiple of the device count.
  config.train.steps = 50_000  # EDIT: about 80 epochs is the published budget.
  config.train.log_every = 100
  config.train.checkpoint_every = 2000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8
  config.eval.postprocess = "coco"  # Thresholds and area limits tuned for COCO-sized images; "cityscapes", "ade20k".
  config.eval.max_images = 0
  config.eval.num_visualizations = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1  # > 1 shards parameters and optimizer state over that many devices (FSDP).
  return config
