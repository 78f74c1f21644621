"""The kMaX-DeepLab optimiser: AdamW, linear warm-up then poly decay, weight decay on kernels, backbone LR x 0.1.

DeepLab2's recipe, as pure optax transformations:
- learning rate `base * step / warmup` during warm-up, then `base * (1 - step / total) ** power` (the poly decay is
  evaluated at the global step, not restarted after warm-up);
- decoupled weight decay scaled by the learning rate, on convolution / dense kernels only (never on norms, biases or
  the cluster centres);
- the backbone's whole update (Adam step and decay) scaled by `backbone_multiplier`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimiser's settings (DeepLab2's kMaX-DeepLab defaults; field names match `config.optim`)."""

  base_lr: float = 5e-4  # For batch 64; DeepLab2 scales it linearly with the batch.
  warmup_steps: int = 5000
  poly_power: float = 0.9
  weight_decay: float = 0.05
  backbone_multiplier: float = 0.1  # 1.0 for a backbone trained from scratch.
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-7


def learning_rate_schedule(base_lr: float, warmup_steps: int, total_steps: int, power: float = 0.9
                           ) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then polynomial decay to 0 at `total_steps`."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = base_lr * step / max(warmup_steps, 1)
    decay = base_lr * jnp.clip(1.0 - step / total_steps, 0.0, 1.0) ** power
    return jnp.where(step < warmup_steps, warmup, decay)

  return schedule


def _path_names(path) -> tuple[str, ...]:
  """Dict keys and sequence indices of a tree path; attribute keys (an NNX Variable's `.value`) are wrappers."""
  return tuple(str(k.key) if isinstance(k, jax.tree_util.DictKey) else str(k.idx)
               for k in path if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))


def is_kernel(path) -> bool:
  """Weight decay applies to conv / dense kernels: parameters named `kernel`."""
  return _path_names(path)[-1] == "kernel"


def is_backbone(path) -> bool:
  """Parameters of the pixel encoder live under the model attribute `backbone`."""
  return "backbone" in _path_names(path)


def make_optimizer(base_lr: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   backbone_multiplier: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
                   poly_power: float = 0.9) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (the optax transformation, its learning-rate schedule for logging); arguments as in `OptimConfig`."""
  schedule = learning_rate_schedule(base_lr, warmup_steps, total_steps, poly_power)
  where = lambda predicate: lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: predicate(path), params)
  transform = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=where(is_kernel)),
      optax.scale_by_learning_rate(schedule),
      optax.masked(optax.scale(backbone_multiplier), where(is_backbone)),
  )
  return transform, schedule
