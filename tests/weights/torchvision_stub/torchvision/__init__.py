"""An import-only stand-in for torchvision, for the weight-import tests (tests/weights) and nothing else.

Why: timm 1.0.31, which builds the PyTorch reference networks of tests/weights/test_backbones.py, imports torchvision
when it is imported (`torchvision.ops.misc.FrozenBatchNorm2d` in its layers, datasets and transforms in `timm.data`),
but the tests use no torchvision code, and no torchvision wheel imports beside the pinned CPU torch here (PyPI's is
built against another torch). So this package defines exactly the names timm imports at module load and nothing
more: every class raises when instantiated (`InterpolationMode`, an enum whose members timm puts in a dict at
import, is the only value). Optional imports that timm guards (`torchvision.models.feature_extraction`,
`datasets.ImageNet`, ...) are deliberately absent, so timm takes its fallbacks.

It is put on `sys.path` only by the `timm` fixture of tests/weights/test_backbones.py, and only when no real
torchvision is importable. Were any of it ever used, the test would fail loudly instead of computing with a stub.
"""


class Unavailable:
  """Base of every stand-in class: instantiating one raises."""

  def __init__(self, *args, **kwargs):
    raise RuntimeError(f"{type(self).__module__}.{type(self).__qualname__} is an import-only stand-in "
                       "(tests/weights/torchvision_stub): the weight-import tests must not use torchvision")
