r"""The demo: a small kMaX model on the built-in synthetic street scenes, sized for a 2-core CPU (~10 minutes).

  python -m panoptic_jax.main --config=configs/demo.py --workdir=runs/demo

The synthetic dataset is generated on first use into `dataset.synthetic.cache_dir` (panoptic_jax/data/synthetic.py).
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
  config.dataset.synthetic = ml_collections.ConfigDict()  # Generated on first use; train / val point into it.
  config.dataset.synthetic.cache_dir = "~/.cache/panoptic_jax/synthetic"
  config.dataset.synthetic.num_train = 400
  config.dataset.synthetic.num_val = 200  # 50 held only 6 labelled poles: PQ moved by 2 points with the draw.
  config.dataset.synthetic.height = 128
  config.dataset.synthetic.width = 256
  config.dataset.synthetic.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = "kmax_small"  # Architecture numbers live in panoptic_jax/model/kmax_deeplab.py.
  config.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 parameters.
  config.model.remat = False  # Recompute activations per stage in the backward pass (less memory, ~30% slower).

  config.input = ml_collections.ConfigDict()
  config.input.crop_size = (129, 257)
  config.input.min_scale = 0.75
  config.input.max_scale = 1.25
  config.input.resize_to_crop = False  # Eval pads the 128x256 images into the crop, no resampling.
  config.input.num_workers = 0  # Read in threads of the main process: 2 cores are busy with the model.
  config.input.max_skipped_fraction = 0.01  # Undecodable samples are skipped; past this share (and 10) training stops.

  config.loss = ml_collections.ConfigDict()
  config.loss.pq_weight = 3.0
  config.loss.mask_id_weight = 0.3
  config.loss.instance_weight = 1.0
  config.loss.semantic_weight = 1.0
  config.loss.instance_temperature = 1.5
  config.loss.instance_sample_k = 512  # A quarter of the demo's 33x65 output pixels.
  config.loss.semantic_topk = 1.0

  config.optim = ml_collections.ConfigDict()
  # Trained from scratch at batch 8. Runs of 1,000 steps reached PQ 47.9 / 54.0 / 57.1 / 62.1 / 61.9 at 2e-3 / 4e-3 /
  # 8e-3 / 1.6e-2 / 3.2e-2 (DeepLab2's 5e-4 is for batch 64 and a pretrained backbone).
  config.optim.base_lr = 1.6e-2
  config.optim.warmup_steps = 100
  config.optim.poly_power = 0.9
  config.optim.weight_decay = 0.05
  config.optim.backbone_multiplier = 1.0  # Trained from scratch: no pretrained backbone to protect.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-7

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8
  config.train.steps = 2000
  config.train.log_every = 25
  config.train.checkpoint_every = 250
  config.train.keep_checkpoints = 3
  config.train.eval_every = 2000  # Once, at the end (the demo's time budget).

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8
  config.eval.postprocess = "synthetic"  # Thresholds and area limits: panoptic_jax/inference/postprocess.py.
  config.eval.max_images = 0  # 0 = the whole validation set.
  config.eval.num_visualizations = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: the devices that remain after the other axes.
  config.mesh.fsdp = 1
  return config
