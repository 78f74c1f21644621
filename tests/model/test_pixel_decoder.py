"""The pixel decoder's relative positions: built without gathers, equal to the gathered table."""

import jax
import numpy as np
import pytest

from panoptic_jax.model.pixel_decoder import MAX_SPAN, relative_embeddings


@pytest.mark.parametrize("length", [1, 2, 5, 17, 41])
def test_relative_embeddings_equal_gather(length):
  table = jax.random.normal(jax.random.key(0), (2 * MAX_SPAN - 1, 3))
  idx = np.arange(length)[None, :] - np.arange(length)[:, None] + MAX_SPAN - 1
  np.testing.assert_array_equal(np.asarray(relative_embeddings(table, length)), np.asarray(table)[idx])
