"""Datasets in the project's format, from a local folder or an S3-compatible bucket, into Grain pipelines.

- `storage`: every user location (local path, `s3://bucket/prefix`): `open_storage`, retries, `StorageError`.
- `dataset_format`: metadata.yaml and the 2-page TIFF annotations <-> canonical panoptic maps (`DatasetInfo`).
- `dataset`: `Dataset.open(location)`, the paired images and annotations of one location.
- `source`, `transforms`, `pipeline`: Grain source, augmentation and mask-slot targets, train / eval iterators.
- `validate`: `python -m panoptic_jax.data.validate`; `synthetic`: the demo's scenes; `convert/`: COCO, Cityscapes.

The submodules are imported where they are used (a command that only validates does not load Grain).
"""
