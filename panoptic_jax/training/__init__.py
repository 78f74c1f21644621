"""Training: ties data, model and evaluation together.

- `config`: the run configuration (the locked base, checks); `workdir`: a run's folder, its config and its lock.
- `train`: `run(config, workdir, mode)`, the train step and the loop; `eval_loop`: evaluation during training.
- `losses`, `matching`: the kMaX-DeepLab losses and the exact on-device Hungarian matching.
- `optim`: AdamW with DeepLab2's schedule; `sharding`: the device mesh and batch sharding; `checkpoint`: Orbax.
- `data_health`: skipped samples and dropped segments; `metrics_writer`: metrics.jsonl, TensorBoard, progress.
"""
