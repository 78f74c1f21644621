"""What a model needs beside its network to turn an image into a panoptic map: its categories, its inference size
and its merge thresholds. A workdir's config gives them (`trained_model.load`); an exported artifact carries them
in its manifest (`to_json` / `from_json`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.resampling import PAD_PIXEL
from panoptic_jax.inference.postprocess import PostprocessConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model's categories, inference geometry and merge thresholds.

  Attributes:
    info: categories, colours, things and label divisor of the training set (the output maps' label space).
    crop_size: (h, w) of the network's input; every image is resized to fit it (long side to the crop, aspect kept)
      and padded bottom / right with `pad_value`, as the evaluation during training does.
    resize_to_crop: False pads only (an image larger than the crop is then an error).
    postprocess: the mask-wise merge's thresholds.
    pad_value: the uint8 value of the padding.
  """

  info: fmt.DatasetInfo
  crop_size: tuple[int, int]
  resize_to_crop: bool
  postprocess: PostprocessConfig
  pad_value: int = PAD_PIXEL

  def to_json(self) -> dict[str, Any]:
    info = self.info
    return {"categories": list(info.categories), "colors": [list(c) if c is not None else None for c in info.colors],
            "is_thing": list(info.is_thing), "label_divisor": info.label_divisor, "crop_size": list(self.crop_size),
            "resize_to_crop": self.resize_to_crop, "pad_value": self.pad_value,
            "input": "uint8 RGB [B, crop_h, crop_w, 3], values 0..255 (the network normalises: x / 127.5 - 1)",
            "postprocess": dataclasses.asdict(self.postprocess)}

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> "ModelSpec":
    colors = tuple(tuple(c) if c is not None else None for c in record["colors"])
    info = fmt.DatasetInfo(tuple(record["categories"]), colors, tuple(bool(t) for t in record["is_thing"]),
                           label_divisor=int(record["label_divisor"]))
    return cls(info, tuple(record["crop_size"]), bool(record["resize_to_crop"]),
               PostprocessConfig(**record["postprocess"]), int(record["pad_value"]))
