"""Stand-in `torchvision.datasets`: the classes `timm.data.dataset_factory` imports unguarded (see the package
docstring); the guarded ones (Places365, INaturalist, QMNIST, ImageNet) are left out on purpose."""

from torchvision import Unavailable


class CIFAR10(Unavailable):
  pass


class CIFAR100(Unavailable):
  pass


class MNIST(Unavailable):
  pass


class KMNIST(Unavailable):
  pass


class FashionMNIST(Unavailable):
  pass


class ImageFolder(Unavailable):
  pass
