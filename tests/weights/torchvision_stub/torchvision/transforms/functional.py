"""Stand-in `torchvision.transforms.functional`: `timm.data` imports InterpolationMode and keys a dict with these
members at import (see the package docstring)."""

import enum


class InterpolationMode(enum.Enum):
  NEAREST = "nearest"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"
  BOX = "box"
  HAMMING = "hamming"
  LANCZOS = "lanczos"
