"""kMaX-DeepLab in Flax NNX: backbones, pixel decoder, kMaX transformer decoder, heads, presets.

`build_model(preset, num_classes, rngs=...)` and the output contract live in `kmax_deeplab.py`; the logical axis
names of the parameters and their default mesh rules in `sharding_rules.py`.
"""

from panoptic_jax.model.kmax_deeplab import (PRESETS, KMaXConfig, KMaXDeepLab, abstract_model, build_model,
                                             get_config, param_breakdown)
from panoptic_jax.model.sharding_rules import DEFAULT_AXIS_RULES, param_shardings

__all__ = ["PRESETS", "KMaXConfig", "KMaXDeepLab", "abstract_model", "build_model", "get_config",
           "param_breakdown", "DEFAULT_AXIS_RULES", "param_shardings"]
