"""Pictures of panoptic maps: category colours with per-instance shading, boundaries, and image | GT | prediction.

`comparison` draws the training loop's evaluation pictures; `labelled_overlay` the prediction command's (the image
with its segments, their outlines and a legend of the categories present).
"""

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from panoptic_jax.data.dataset_format import VOID, Color, DatasetInfo

_NO_COLOR = (128, 128, 128)  # For a category without a colour in the metadata.


def colorize(panoptic: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """int32 [H, W] canonical map -> uint8 [H, W, 3]: category colour, thing instances shaded apart, void black."""
  palette = np.array([c if c is not None else _NO_COLOR for c in info.colors], np.float32)
  void = panoptic == VOID
  category = np.where(void, 0, panoptic // info.label_divisor)
  instance = np.where(void, 0, panoptic % info.label_divisor)
  # Alternate instances of one class between lighter and darker shades so that touching instances separate.
  shade = np.where(instance > 0, 0.65 + 0.35 * ((instance * 0.618034) % 1.0), 1.0)
  rgb = palette[category] * shade[..., None]
  rgb[_boundaries(panoptic)] = 255.0
  rgb[void] = 0.0
  return rgb.astype(np.uint8)


def _boundaries(panoptic: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose right or lower neighbour belongs to another segment."""
  edge = np.zeros(panoptic.shape, bool)
  edge[:, :-1] |= panoptic[:, :-1] != panoptic[:, 1:]
  edge[:-1, :] |= panoptic[:-1, :] != panoptic[1:, :]
  return edge


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """bool [H, W] grown by `radius` steps to the 4 neighbours."""
  for _ in range(radius):
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    mask = grown
  return mask


def overlay(image: np.ndarray, panoptic: np.ndarray, info: DatasetInfo, alpha: float = 0.55) -> np.ndarray:
  """Blends the colourised map over the image (void pixels show the image)."""
  colors = colorize(panoptic, info).astype(np.float32)
  blend = np.where((panoptic == VOID)[..., None], image, (1 - alpha) * image + alpha * colors)
  return blend.astype(np.uint8)


def comparison(image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray, info: DatasetInfo) -> bytes:
  """PNG bytes of image | ground truth | prediction side by side (maps at the image's size)."""
  gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
  row = np.concatenate([image, gap, overlay(image, ground_truth, info), gap, overlay(image, prediction, info)], 1)
  buffer = io.BytesIO()
  Image.fromarray(row).save(buffer, format="PNG")
  return buffer.getvalue()


def legend_font_size(height: int) -> int:
  """Pixel size of the legend's font for an image `height` pixels high: 1/40 of it, within 12..64 (readable on a
  thumbnail, not dominating a large photo)."""
  return int(min(64, max(12, round(height / 40))))


def legend(entries: list[tuple[str, Color]], font_size: int) -> np.ndarray:
  """uint8 [h, w, 3]: one row per (name, colour), a swatch of the colour (outlined in black so that light colours
  show) and the name, on white."""
  font = ImageFont.load_default(size=font_size)  # Cheap (0.1 ms); a font object per call is safe across threads.
  pad, row = font_size // 2, round(1.5 * font_size)
  text_width = math.ceil(max((font.getlength(name) for name, _ in entries), default=0))
  picture = Image.new("RGB", (3 * pad + font_size + text_width + pad, 2 * pad + row * len(entries)), "white")
  draw = ImageDraw.Draw(picture)
  for i, (name, color) in enumerate(entries):
    top = pad + i * row + (row - font_size) // 2
    draw.rectangle((pad, top, pad + font_size - 1, top + font_size - 1), fill=tuple(color), outline=(0, 0, 0))
    draw.text((2 * pad + font_size + pad // 2, top + font_size // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
  return np.asarray(picture)


def labelled_overlay(image: np.ndarray, panoptic: np.ndarray, info: DatasetInfo, alpha: float = 0.55) -> np.ndarray:
  """The picture of a prediction: the image with its segments and, to its right, a legend.

  Args:
    image: uint8 [H, W, 3].
    panoptic: int32 [H, W] canonical map.
    info: categories, colours, label divisor.
    alpha: opacity of the segment colours.

  Returns:
    uint8 [max(H, h), W + w, 3]: at the top left the image with the segments blended in their category colours (thing
    instances shaded apart, as `colorize`) and white segment outlines, thicker on larger images; at the right a legend
    [h, w] of the categories present, in metadata order (`legend`, font size `legend_font_size(H)`); white elsewhere.
  """
  picture = overlay(image, panoptic, info, alpha)
  thickness = max(1, round(max(panoptic.shape) / 500))  # 1 px up to ~750 px, then growing so that outlines show.
  picture[_dilate(_boundaries(panoptic), thickness // 2)] = 255
  present = np.unique(panoptic[panoptic != VOID] // info.label_divisor)
  key = legend([(info.categories[c], info.colors[c] or _NO_COLOR) for c in present], legend_font_size(image.shape[0]))
  h, w = picture.shape[:2]
  canvas = np.full((max(h, key.shape[0]), w + key.shape[1], 3), 255, np.uint8)
  canvas[:h, :w] = picture
  canvas[:key.shape[0], w:] = key
  return canvas
