"""Exact linear sum assignment (Hungarian matching) in pure JAX.

`linear_sum_assignment(cost)` follows `scipy.optimize.linear_sum_assignment`: it returns `(row_ind, col_ind)` with
`min(n, m)` pairs, rows sorted ascending, minimising `cost[row_ind, col_ind].sum()` (or maximising with
`maximize=True`). It is jittable and vmappable (`jax.vmap(linear_sum_assignment)(costs)` for a batch `[B, n, m]`),
needs no host callback and works for square and rectangular matrices.

Algorithm: shortest augmenting paths with dual potentials (Jonker-Volgenant style, the algorithm scipy uses, see
Crouse, "On implementing 2D rectangular assignment algorithms", IEEE TAES 2016). One `fori_loop` step per row
adds that row to the matching: a Dijkstra search over reduced costs (`lax.while_loop`, one column settled per step,
each step a vectorised `O(m)` update) finds the cheapest augmenting path, the potentials are updated and the path
is flipped. Work is `O(n^2 m)` in the worst case; the number of sequential steps is the total length of the
augmenting paths, usually far below that bound.

Numerics: the computation runs in the cost dtype (float32 unless x64 is enabled). Each row is shifted by its
minimum first, which leaves the optimum unchanged and keeps the potentials small; with costs that mix large pad
values (kMaX pads with +-999) and values in [-1, 0], the float32 result is optimal up to rounding of the
potentials (about 1e-7 x the cost range). Ties are broken toward free columns, as in scipy. Costs must be finite
(scipy rejects infeasible matrices; this function cannot raise inside jit, so infinite or NaN entries give an
unspecified assignment).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["linear_sum_assignment", "assignment_cost"]


def _solve_wide(cost: jax.Array) -> jax.Array:
  """Assigns every row of `cost` [n, m] (n <= m) to a distinct column; returns col4row [n] int32."""
  n, m = cost.shape
  dtype = cost.dtype
  inf = jnp.array(jnp.inf, dtype)
  rows = jnp.arange(n, dtype=jnp.int32)
  cols = jnp.arange(m, dtype=jnp.int32)

  def add_row(cur_row, state):
    u, v, col4row, row4col = state

    # Dijkstra over reduced costs from `cur_row` until a free column (the sink) is settled.
    def search_cond(s):
      return s[-1] < 0

    def search_body(s):
      i, min_val, spc, path, in_sr, in_sc, _ = s
      in_sr = in_sr | (rows == i)
      reduced = min_val + lax.dynamic_index_in_dim(cost, i, keepdims=False) - u[i] - v
      better = (~in_sc) & (reduced < spc)
      path = jnp.where(better, i, path)
      spc = jnp.where(better, reduced, spc)
      open_spc = jnp.where(in_sc, inf, spc)
      low = jnp.min(open_spc)
      cand = (~in_sc) & (open_spc == low)
      free_cand = cand & (row4col < 0)
      j = jnp.where(jnp.any(free_cand), jnp.argmax(free_cand), jnp.argmax(cand)).astype(jnp.int32)
      in_sc = in_sc | (cols == j)
      owner = row4col[j]
      sink = jnp.where(owner < 0, j, -1)
      i = jnp.where(owner < 0, i, owner)
      return i, low, spc, path, in_sr, in_sc, sink

    init = (
        cur_row.astype(jnp.int32),
        jnp.zeros((), dtype),
        jnp.full((m,), inf, dtype),
        jnp.full((m,), -1, jnp.int32),
        jnp.zeros((n,), bool),
        jnp.zeros((m,), bool),
        jnp.array(-1, jnp.int32),
    )
    _, min_val, spc, path, in_sr, in_sc, sink = lax.while_loop(search_cond, search_body, init)

    # Dual update: keeps reduced costs non-negative and zero on the (new) matching.
    is_cur = rows == cur_row
    spc_of_row = spc[jnp.clip(col4row, 0, m - 1)]
    u = jnp.where(is_cur, u + min_val, u)
    u = jnp.where(in_sr & ~is_cur, u + min_val - spc_of_row, u)
    v = jnp.where(in_sc, v - (min_val - spc), v)

    # Flip the augmenting path back from the sink to `cur_row`.
    def aug_cond(s):
      return ~s[-1]

    def aug_body(s):
      j, col4row, row4col, _ = s
      i = path[j]
      row4col = jnp.where(cols == j, i, row4col)
      prev = col4row[i]
      col4row = jnp.where(rows == i, j, col4row)
      return prev, col4row, row4col, i == cur_row

    _, col4row, row4col, _ = lax.while_loop(aug_cond, aug_body, (sink, col4row, row4col, jnp.array(False)))
    return u, v, col4row, row4col

  state = (jnp.zeros((n,), dtype), jnp.zeros((m,), dtype), jnp.full((n,), -1, jnp.int32),
           jnp.full((m,), -1, jnp.int32))
  _, _, col4row, _ = lax.fori_loop(0, n, add_row, state)
  return col4row


def linear_sum_assignment(cost: jax.Array, maximize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Solves the linear sum assignment problem exactly, like scipy.optimize.linear_sum_assignment.

  Args:
    cost: [n, m] finite cost matrix (any real dtype; integers are promoted to float).
    maximize: maximise the total instead of minimising it.

  Returns:
    (row_ind, col_ind): two int32 arrays of length min(n, m); row_ind is sorted ascending and
    `cost[row_ind, col_ind].sum()` is optimal. Use `jax.vmap` for a batch of matrices.
  """
  cost = jnp.asarray(cost)
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment expects a 2-D cost matrix, found shape {cost.shape}; "
                     "use jax.vmap for a batch")
  if not jnp.issubdtype(cost.dtype, jnp.floating):
    cost = cost.astype(jnp.float32)
  n, m = cost.shape
  if n == 0 or m == 0:
    empty = jnp.zeros((0,), jnp.int32)
    return empty, empty
  if maximize:
    cost = -cost
  transposed = n > m
  if transposed:
    cost = cost.T
  # Shifting each row by a constant leaves the optimum unchanged and keeps reduced costs small.
  cost = cost - jnp.min(cost, axis=1, keepdims=True)
  col4row = _solve_wide(cost)
  if not transposed:
    return jnp.arange(n, dtype=jnp.int32), col4row
  # col4row maps each original column to its row; scipy's contract sorts by row.
  order = jnp.argsort(col4row).astype(jnp.int32)
  return col4row[order], order


def assignment_cost(cost: jax.Array, row_ind: jax.Array, col_ind: jax.Array) -> jax.Array:
  """Total cost `cost[row_ind, col_ind].sum()` (works under vmap)."""
  return jnp.sum(cost[row_ind, col_ind])
