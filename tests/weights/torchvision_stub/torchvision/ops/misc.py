"""Stand-in `torchvision.ops.misc`: `timm.layers` imports FrozenBatchNorm2d (see the package docstring)."""

from torchvision import Unavailable


class FrozenBatchNorm2d(Unavailable):
  pass
