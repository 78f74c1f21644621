"""Stand-in `torchvision.transforms`: `timm.data.transforms` subclasses ToTensor at import (see the package
docstring)."""

from torchvision import Unavailable


class ToTensor(Unavailable):
  pass
