"""Semantic-only evaluation on an external validation set: per-class IoU, mIoU, pixel accuracy, confusion matrix.

    python -m panoptic_jax.evaluate --gt EXTERNAL --pred PREDICTIONS [--class_map MAP.yaml] [--out r.json] \\
        [--pictures DIR [--max_pictures 20]]

EXTERNAL is a dataset in the format's semantic variant (`task: semantic segmentation`: one RGB label image per
image, black = void; dataset_format's docstring). PREDICTIONS is a dataset in the project's format as
`python -m panoptic_jax.predict` writes it: a pixel's class is its category. Images are paired by name (file stem);
a prediction whose size differs from its label's by one factor (it is at the image's size, the label may be smaller)
is resized (nearest) to the label, so scores are counted at the labels' resolution.

Label spaces: the external set's categories ("theirs") are mapped onto the predictions' ("ours") by name, or through a
class map (`panoptic_jax.data.class_map`: `their name: our name`, many-to-one allowed, null or unlisted = void). An
external category that maps to nothing is void for scoring; the output lists it with its pixels and their share of
all label pixels.

Scores are computed in our label space over the "evaluated classes": our categories that at least one external
category maps to (the others cannot occur in the mapped ground truth; predicting one on a labelled pixel is an error
of that pixel's class, and the output lists those predictions). The confusion matrix has a row per evaluated class
(GT after mapping) and a column per predicted category plus "void" (pixels the prediction leaves void, misses).
Per-class IoU = tp / (tp + fp + fn) over the scored pixels (GT not void after mapping). The headline mIoU averages
the evaluated classes that occur in the GT or are predicted (tp + fp + fn > 0; cityscapesScripts, mmseg, Keras
MeanIoU: docs/metrics.md), the output names them; the mean over the classes present in the GT is reported beside
it. Pixel accuracy = correct / scored pixels.

`--pictures DIR` (a folder or s3://) writes `comparisons/<stem>.png` for the first `max_pictures` images (image |
label in the external set's colours | prediction in the predictions' colours, each at the label's size, 4-pixel white
gaps) and `confusion_matrix.png` (row-normalised; rows and columns the evaluated classes, and a last column "other":
predicted void or a class without a GT counterpart).
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from panoptic_jax.data import class_map as class_map_lib
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.storage import open_storage
from panoptic_jax.evaluation import semantic as semantic_lib
from panoptic_jax.evaluation.evaluator import EvaluationError, Side, open_dataset_side, pair_images

HEADLINE_CONVENTION = "classes_with_union"
COMPARISONS = "comparisons"
CONFUSION_PICTURE = "confusion_matrix.png"
GAP = 4  # White pixels between the panels of a comparison picture.
_NO_COLOR = (128, 128, 128)


def _palette(info: fmt.DatasetInfo) -> np.ndarray:
  """uint8 [C + 1, 3]: each category's colour, then black for void (index -1)."""
  return np.array([c if c is not None else _NO_COLOR for c in info.colors] + [(0, 0, 0)], np.uint8)


def _categories(panoptic: np.ndarray, label_divisor: int) -> np.ndarray:
  """int32 [H, W] category of each pixel of a canonical map, -1 for void."""
  return np.where(panoptic >= 0, panoptic // label_divisor, -1).astype(np.int32)


def _read_native(side: Side, key: str) -> tuple[np.ndarray, str]:
  """(int32 [h, w] category map at the annotation file's own size, the file's URL)."""
  dataset = side.dataset
  relpath = dataset.examples[side.positions[key]].annotation
  where = dataset.storage.url(relpath)
  panoptic = fmt.decode_annotation(dataset.storage.read_bytes(relpath), dataset.info, where=where)
  return _categories(panoptic, dataset.info.label_divisor), where


def _to_label_size(pred: np.ndarray, label_hw: tuple[int, int], pred_where: str, label_where: str) -> np.ndarray:
  """The prediction resized (nearest) to the label's size; EvaluationError when no one factor relates the sizes."""
  if pred.shape == tuple(label_hw):
    return pred
  small, big = (label_hw, pred.shape) if pred.shape[0] >= label_hw[0] else (pred.shape, label_hw)
  try:
    fmt.check_scale(tuple(small), tuple(big), pred_where)
  except fmt.FormatError:
    raise EvaluationError(
        f"{pred_where}: the prediction is {pred.shape[0]}x{pred.shape[1]} but its label {label_where} is "
        f"{label_hw[0]}x{label_hw[1]}: no single factor scales one to the other (aspect ratios "
        f"{pred.shape[1] / pred.shape[0]:.4f} and {label_hw[1] / label_hw[0]:.4f})") from None
  return fmt.resize_nearest(pred, tuple(label_hw))


def _image(side: Side, key: str, hw: tuple[int, int]) -> np.ndarray | None:
  """uint8 [h, w, 3]: the side's image of `key` resized to `hw`, or None when it has none."""
  dataset = side.dataset
  relpath = dataset.examples[side.positions[key]].image
  if relpath is None:
    return None
  image = fmt.decode_image(dataset.storage.read_bytes(relpath), where=dataset.storage.url(relpath))
  if image.shape[:2] != tuple(hw):
    image = np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
  return image


def comparison_picture(image: np.ndarray | None, label_rgb: np.ndarray, pred_rgb: np.ndarray) -> np.ndarray:
  """uint8 [h, 3 w + 2 GAP, 3]: image | label | prediction, all [h, w, 3] (no image: a gray panel)."""
  h, w = label_rgb.shape[:2]
  image = np.full((h, w, 3), 128, np.uint8) if image is None else image
  gap = np.full((h, GAP, 3), 255, np.uint8)
  return np.concatenate([image, gap, label_rgb, gap, pred_rgb], axis=1)


def confusion_picture(confusion: np.ndarray, rows: list[str], columns: list[str], cell: int = 28) -> np.ndarray:
  """uint8 [H, W, 3]: the row-normalised confusion matrix as a grid, drawn with Pillow.

  Args:
    confusion: [R, K] pixel counts (rows: GT classes, columns: predicted classes).
    rows, columns: their names.
    cell: side of one cell in pixels; each cell shows its row percentage, white (0) to dark blue (100); a row without
      GT pixels is gray.
  """
  confusion = np.asarray(confusion, np.float64)
  totals = confusion.sum(axis=1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    share = np.where(totals > 0, confusion / np.maximum(totals, 1), np.nan)
  font = ImageFont.load_default(size=max(9, cell // 2 - 2))
  pad = cell // 3
  row_text = math.ceil(max((font.getlength(n) for n in rows), default=0))
  col_text = math.ceil(max((font.getlength(n) for n in columns), default=0))
  title = "confusion: rows = ground truth, columns = prediction, % of each row"
  title_h = cell
  left, top = pad + row_text + pad, pad + title_h + col_text + pad
  width = max(left + cell * len(columns) + pad, pad + math.ceil(font.getlength(title)) + pad)
  picture = Image.new("RGB", (width, top + cell * len(rows) + pad), "white")
  draw = ImageDraw.Draw(picture)
  draw.text((pad, pad + title_h // 2), title, fill=(0, 0, 0), font=font, anchor="lm")
  for j, name in enumerate(columns):  # Vertical column names, read bottom to top, ending above their column.
    label = Image.new("RGB", (col_text + 1, cell), "white")
    ImageDraw.Draw(label).text((col_text, cell // 2), name, fill=(0, 0, 0), font=font, anchor="rm")
    picture.paste(label.rotate(90, expand=True), (left + j * cell, pad + title_h))
  for i, name in enumerate(rows):
    y = top + i * cell
    draw.text((left - pad, y + cell // 2), name, fill=(0, 0, 0), font=font, anchor="rm")
    for j in range(len(columns)):
      x, v = left + j * cell, share[i, j]
      if np.isnan(v):
        fill, text = (200, 200, 200), ""
      else:
        fill = tuple(int(round(255 + (c - 255) * v)) for c in (8, 48, 107))
        text = f"{100 * v:.0f}" if confusion[i, j] > 0 else ""
      draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(220, 220, 220))
      if text:
        color = (255, 255, 255) if v > 0.5 else (0, 0, 0)
        draw.text((x + cell // 2, y + cell // 2), text, fill=color, font=font, anchor="mm")
  return np.asarray(picture)


def _png(picture: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(picture).save(buffer, format="PNG")
  return buffer.getvalue()


def evaluate_external(gt_location: str, pred_location: str, class_map: str | None = None,
                      endpoint_url: str | None = None, pictures: str | None = None, max_pictures: int = 20,
                      num_workers: int = 4, progress: bool = True) -> dict:
  """Scores project-format predictions against a semantic-segmentation dataset (see the module docstring).

  Args:
    gt_location: the external set (folder or s3://bucket/prefix) with `task: semantic segmentation`.
    pred_location: the predictions (the project's format).
    class_map: a class map file (their = the external set's names, ours = the predictions'); None: match by name.
    endpoint_url: S3 endpoint for s3:// locations.
    pictures: where to write the pictures (folder or s3://), or None.
    max_pictures: comparison pictures for the first this many images (in name order).
    num_workers: threads reading and decoding files.
    progress: log every 100 images.

  Returns:
    The JSON-serialisable result; `format_report` prints it.

  Raises:
    EvaluationError: the GT is not a semantic dataset, the image sets differ, no category matches, or a prediction's
      size is not its label's scaled by one factor.
    ClassMapError, FormatError, StorageError: naming the file (a bad class map entry, a label colour outside the
      palette, an unreadable file).
  """
  gt, pred = open_dataset_side(gt_location, endpoint_url), open_dataset_side(pred_location, endpoint_url)
  gt_info, pred_info = gt.dataset.info, pred.dataset.info
  if not gt_info.is_semantic:
    raise EvaluationError(f"{gt.describe}: metadata.yaml's task is {gt_info.task!r}; this evaluation needs a "
                          f"{fmt.SEMANTIC_TASK!r} dataset (python -m panoptic_jax.evaluate scores panoptic GT itself)")
  their, ours = list(gt_info.categories), list(pred_info.categories)
  if class_map is not None:
    bridge = class_map_lib.ClassMap.read(class_map, endpoint_url)
    mapping, report = bridge.resolve(
        their, ours, their=f"the GT's categories ({gt.dataset.storage.url('metadata.yaml')})",
        ours=f"the predictions' categories ({pred.dataset.storage.url('metadata.yaml')})")
  else:
    mapping, report = class_map_lib.match_by_name(their, ours)
  if not report.mapped:
    how = f"the class map {class_map} maps none of them" if class_map else "no name is shared (give --class_map)"
    raise EvaluationError(f"{gt.describe}: no GT category maps to a predicted one: {how}; GT categories {their}, "
                          f"predicted categories {ours}")
  pairs = pair_images(gt, pred)
  c, e = len(ours), len(their)
  gt_lookup = np.append(mapping, -1)  # GT category -> ours; index -1 (void) reads the appended -1.
  label_palette, pred_palette = _palette(gt_info), _palette(pred_info)
  out_storage = open_storage(pictures, endpoint_url) if pictures is not None else None

  def score(item):
    k, (g_key, p_key) = item
    label, label_where = _read_native(gt, g_key)
    predicted, pred_where = _read_native(pred, p_key)
    predicted = _to_label_size(predicted, label.shape, pred_where, label_where)
    their_counts = np.bincount(label.ravel() + 1, minlength=e + 1)  # [void, their categories...]
    mapped = gt_lookup[label]
    scored = mapped >= 0
    columns = np.where(predicted >= 0, predicted, c)[scored]
    confusion = np.bincount(mapped[scored] * (c + 1) + columns, minlength=c * (c + 1)).reshape(c, c + 1)
    if out_storage is not None and k < max_pictures:
      image = _image(gt, g_key, label.shape)
      if image is None:
        image = _image(pred, p_key, label.shape)
      picture = comparison_picture(image, label_palette[label], pred_palette[predicted])
      out_storage.write_bytes(f"{COMPARISONS}/{g_key}.png", _png(picture))
    return confusion, their_counts

  confusion = np.zeros((c, c + 1), np.int64)
  their_pixels = np.zeros(e + 1, np.int64)
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    for i, (image_confusion, counts) in enumerate(pool.map(score, enumerate(pairs))):
      confusion += image_confusion
      their_pixels += counts
      if progress and (i + 1) % 100 == 0:
        logging.info("evaluated %d / %d images", i + 1, len(pairs))

  evaluated = sorted(set(mapping[mapping >= 0].tolist()))
  rows = [ours[k] for k in evaluated]
  # Over the evaluated classes, every other prediction (void, a class without a GT counterpart) is one "other" column:
  # the IoUs are those of the full matrix, whose other rows are empty.
  square = confusion[np.ix_(evaluated, evaluated)]
  restricted = np.concatenate([square, confusion[evaluated].sum(axis=1, keepdims=True) - square.sum(1, keepdims=True)],
                              axis=1)
  semantic = semantic_lib.miou_from_confusion(restricted, rows)
  union = [n for n, v in semantic["per_class"].items() if v["iou"] is not None]
  semantic["mIoU"] = semantic[f"mIoU_{HEADLINE_CONVENTION}"]
  semantic["convention"] = HEADLINE_CONVENTION
  semantic["mIoU_classes"] = union
  sources = {n: [t for t, o in report.mapped.items() if o == n] for n in rows}
  for name, entry in semantic["per_class"].items():
    entry["from"] = sources[name]

  total = int(their_pixels.sum())
  index = {n: k for k, n in enumerate(their)}
  ignored = [{"name": n, "pixels": int(their_pixels[index[n] + 1]),
              "share": their_pixels[index[n] + 1] / total if total else 0.0} for n in report.ignored]
  scored_pixels = int(confusion.sum())
  stray = [{"name": ours[k], "pixels": int(confusion[:, k].sum())} for k in range(c)
           if k not in evaluated and confusion[:, k].sum() > 0]

  if out_storage is not None:
    columns = rows + ["other"]
    out_storage.write_bytes(CONFUSION_PICTURE, _png(confusion_picture(restricted, rows, columns)))

  return {
      "task": fmt.SEMANTIC_TASK,
      "gt": gt.describe,
      "pred": pred.describe,
      "class_map": str(class_map) if class_map is not None else None,
      "categories_matched": "through the class map" if class_map is not None else "by name",
      "num_images": len(pairs),
      "semantic": semantic,
      "confusion_matrix": {"rows": rows, "columns": ours + ["void"], "counts": confusion[evaluated].tolist()},
      "pixels": {"total": total, "void": int(their_pixels[0]), "ignored": int(sum(i["pixels"] for i in ignored)),
                 "scored": scored_pixels},
      "ignored_categories": ignored,
      "predicted_without_gt_counterpart": stray,
      "mapping": {n: (ours[k] if k >= 0 else None) for n, k in zip(their, mapping.tolist())},
      "pictures": None if out_storage is None else {
          "location": out_storage.describe(), "comparisons": min(len(pairs), max(0, max_pictures)),
          "confusion_matrix": out_storage.url(CONFUSION_PICTURE)},
  }


def format_report(result: dict) -> str:
  """The text the command prints: per-class IoU, mIoU and its classes, pixel accuracy, ignored categories."""

  def pct(x):
    return "   n/a" if x is None else f"{100 * x:6.2f}"

  sem = result["semantic"]
  width = max(12, *(len(n) for n in sem["per_class"]))
  lines = [f"semantic evaluation of {result['pred']} against {result['gt']} ({result['num_images']} images; "
           f"categories matched {result['categories_matched']}"
           + (f" {result['class_map']}" if result["class_map"] else "") + ")", "",
           f"{'class':<{width}} |    IoU | {'GT px':>10} {'pred px':>10} | from", "-" * (width + 45)]
  for name, entry in sem["per_class"].items():
    lines.append(f"{name:<{width}} | {pct(entry['iou'])} | {entry['gt_pixels']:>10d} {entry['pred_pixels']:>10d} | "
                 + ", ".join(entry["from"]))
  lines += ["", f"mIoU {pct(sem['mIoU'])}  (mean over the {len(sem['mIoU_classes'])} classes that occur in the GT or "
            f"are predicted; over the {sem['n_classes_with_gt']} classes present in the GT: "
            f"{pct(sem['mIoU_classes_with_gt'])})",
            f"pixel accuracy {pct(sem['pixel_accuracy'])}  ({result['pixels']['scored']} scored pixels of "
            f"{result['pixels']['total']}; void in the GT: {result['pixels']['void']})"]
  if result["ignored_categories"]:
    listed = ", ".join(f"{i['name']} ({100 * i['share']:.2f}%)" for i in result["ignored_categories"])
    lines.append(f"ignored GT categories (void for scoring; share of all label pixels): {listed}")
  if result["predicted_without_gt_counterpart"]:
    listed = ", ".join(f"{s['name']} ({s['pixels']} px)" for s in result["predicted_without_gt_counterpart"])
    lines.append(f"predicted on scored pixels, without a GT counterpart (errors of those pixels' classes): {listed}")
  return "\n".join(lines)
