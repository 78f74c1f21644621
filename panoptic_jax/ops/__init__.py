"""Backend-specific kernels and the operations the model shares, chosen per platform in one place.

- `dispatch`: the platform choice (at lowering time; `portable()` forces plain lax); what the model and the training
  code call.
- `cpu_conv`, `xla_cpu`: XLA:CPU formulations of convolutions and matmuls, fusion barriers, compiler options.
- `resize`: the one bilinear resize (model, losses and post-processing).
"""

from panoptic_jax.ops.dispatch import (backward_fusion_barrier, by_platform, conv_general_dilated, dot_general,
                                       fusion_barrier, portable, train_step_compiler_options)
from panoptic_jax.ops.resize import resize_bilinear, sample_bilinear

__all__ = ["backward_fusion_barrier", "by_platform", "conv_general_dilated", "dot_general", "fusion_barrier",
           "portable", "resize_bilinear", "sample_bilinear", "train_step_compiler_options"]
