"""linear_sum_assignment against scipy.optimize.linear_sum_assignment on many random matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from panoptic_jax.training.matching import assignment_cost, linear_sum_assignment

# One jit per shape; every shape holds a vmapped batch of matrices of mixed kinds.
SHAPES = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8), (17, 17), (33, 33), (64, 64), (128, 128), (200, 200),
          (256, 256), (1, 7), (7, 1), (3, 10), (10, 3), (20, 50), (50, 20), (100, 133), (133, 100), (256, 100),
          (64, 256)]
PER_SHAPE = 25
KINDS = ("uniform", "integer_ties", "kmax_padded", "wide_range", "all_equal")


def _matrix(rng: np.random.Generator, n: int, m: int, kind: str) -> np.ndarray:
  if kind == "uniform":
    return rng.random((n, m))
  if kind == "integer_ties":
    return rng.integers(0, 4, (n, m)).astype(np.float64)
  if kind == "wide_range":
    return rng.normal(0.0, 300.0, (n, m))
  if kind == "all_equal":
    return np.full((n, m), 3.0)
  # kMaX-like: -(dice x class prob) in [-1, 0] for the real ground-truth masks (rows), void rows padded
  # with -999 (more slots than masks) or +999, and a random block of -999 padding columns.
  cost = -rng.random((n, m)) * rng.random((n, m))
  num_real = rng.integers(0, n + 1)
  cost[num_real:] = rng.choice([-999.0, 999.0])
  num_pad_cols = rng.integers(0, m // 2 + 1)
  if num_pad_cols:
    cost[:, m - num_pad_cols:] = -999.0
  return cost


@pytest.mark.slow
def test_matches_scipy_on_random_matrices():
  rng = np.random.default_rng(1234)
  solve = jax.vmap(linear_sum_assignment)
  checked = 0
  for n, m in SHAPES:
    kinds = [KINDS[i % len(KINDS)] for i in range(PER_SHAPE)]
    costs = np.stack([_matrix(rng, n, m, kind) for kind in kinds]).astype(np.float32)
    rows, cols = jax.jit(solve)(costs)
    rows, cols = np.asarray(rows), np.asarray(cols)
    k = min(n, m)
    assert rows.shape == cols.shape == (PER_SHAPE, k)
    for b in range(PER_SHAPE):
      c = costs[b].astype(np.float64)
      assert np.all(np.diff(rows[b]) > 0), f"rows not sorted for {n}x{m}"
      assert len(np.unique(cols[b])) == k and cols[b].min() >= 0 and cols[b].max() < m
      if n <= m:
        np.testing.assert_array_equal(rows[b], np.arange(n))
      ref_r, ref_c = scipy_lsa(c)
      ours, ref = c[rows[b], cols[b]].sum(), c[ref_r, ref_c].sum()
      assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref)), (n, m, kinds[b], ours, ref)
      checked += 1
  assert checked >= 500


def test_maximize_integer_input_and_empty():
  rng = np.random.default_rng(7)
  c = rng.integers(-5, 6, (6, 9))
  rows, cols = jax.jit(linear_sum_assignment, static_argnames="maximize")(c, maximize=True)
  ref_r, ref_c = scipy_lsa(c, maximize=True)
  assert c[np.asarray(rows), np.asarray(cols)].sum() == c[ref_r, ref_c].sum()
  assert float(assignment_cost(jnp.asarray(c, jnp.float32), rows, cols)) == c[ref_r, ref_c].sum()
  r, cc = linear_sum_assignment(jnp.zeros((0, 4)))
  assert r.shape == cc.shape == (0,)
  with pytest.raises(ValueError, match="2-D"):
    linear_sum_assignment(jnp.zeros((2, 3, 3)))


def test_permutation_matrix_is_recovered():
  # A cost with a unique optimum at a known permutation: -1 on the permutation, 0 elsewhere.
  perm = np.random.default_rng(3).permutation(40)
  c = np.zeros((40, 40), np.float32)
  c[np.arange(40), perm] = -1.0
  _, cols = jax.jit(linear_sum_assignment)(c)
  np.testing.assert_array_equal(np.asarray(cols), perm)
