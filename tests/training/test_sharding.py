"""Mesh shapes, batch splitting and their errors."""

import jax
import numpy as np
import pytest

from panoptic_jax.training import sharding


@pytest.mark.parametrize("data,fsdp,expected", [(-1, 1, (8, 1)), (4, 2, (4, 2)), (2, -1, (2, 4)), (1, 8, (1, 8))])
def test_mesh_shape_resolves_the_remaining_devices(data, fsdp, expected):
  assert sharding.mesh_shape(data, fsdp, 8) == expected


@pytest.mark.parametrize("data,fsdp,message", [(-1, -1, "at most one"), (3, 1, "does not divide"),
                                               (2, 2, "4 devices"), (0, 1, "positive")])
def test_impossible_meshes_name_the_field(data, fsdp, message):
  with pytest.raises(sharding.ShardingError, match=message) as error:
    sharding.mesh_shape(data, fsdp, 8)
  assert "config.mesh" in str(error.value)


def test_batch_that_the_devices_cannot_split_is_a_clear_error():
  mesh = sharding.make_mesh(4, 2)
  assert sharding.check_batch_size(16, mesh) == 16
  with pytest.raises(sharding.ShardingError, match=r"config.train.batch_size: 12 images .* multiple of 8"):
    sharding.check_batch_size(12, mesh)


def test_global_batch_is_sharded_over_both_axes_and_drops_host_keys():
  mesh = sharding.make_mesh(4, 2)
  local = {"image": np.zeros((8, 5, 5, 3), np.uint8), "name": np.array(["a"] * 8)}
  batch = sharding.global_batch(local, mesh)
  assert set(batch) == {"image"}
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
  assert len(batch["image"].addressable_shards) == 8
