"""`--config=panoptic_jax/training/workdir_config.py:WORKDIR`: the run config that WORKDIR's config.json records.

`python -m panoptic_jax.main` passes this when it is given a workdir that holds a run and no --config.
"""

import ml_collections

from panoptic_jax.training import config, workdir


def get_config(path: str) -> ml_collections.ConfigDict:
  wd = workdir.Workdir(path)
  record = wd.read_run()
  if record is None:
    raise workdir.WorkdirError(f"{wd} holds no run (no {workdir.CONFIG}); pass --config to start one there")
  return config.from_record(record, wd.url(workdir.CONFIG))
