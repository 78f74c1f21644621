"""Weights from elsewhere: ImageNet backbones, the authors' PyTorch port of kMaX-DeepLab, other runs.

- `readers`: tensors from `.pth` / `.pkl` / `.safetensors` / `.npz`, with an unpickler that builds arrays only.
- `mapping`: entries (our variable <- the file's tensors), the layout conversions, naming schemes.
- `backbones`: ResNet (torchvision / timm, detectron2) and ConvNeXt (official, timm) namings.
- `kmax_port`: the port's whole-model naming and label spaces.
- `importer`: scheme detection, the plan (what fills what, class rows by name), placing it in a state, the report.
- `init_from`: `config.model.init_from` at the start of a run. `python -m panoptic_jax.weights inspect FILE`.
"""
