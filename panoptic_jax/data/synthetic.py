"""A procedural street-scene dataset in the project's format: the built-in demo dataset.

    python -m panoptic_jax.data.synthetic --out LOCATION --num_train 400 --num_val 100 --seed 0 \
        [--height 128 --width 256] [--endpoint_url URL] [--num_workers N]

writes two datasets in the project's format (README.md, "The dataset format"), one per split, each complete on its own:

    LOCATION/train/images/000000.jpg ...   LOCATION/train/panoptic_maps/000000.tif ...   LOCATION/train/metadata.yaml
    LOCATION/val/images/...                LOCATION/val/panoptic_maps/...                LOCATION/val/metadata.yaml

LOCATION is a local folder or `s3://bucket/prefix` (with --endpoint_url for a non-AWS store); files go through
`storage.open_storage`. metadata.yaml is written last, so a dataset with a metadata file is complete.

Scenes: a pinhole camera above a flat ground plane (horizon, road vanishing towards it). Stuff: road (with lane
markings and crosswalks), sidewalk (tiles, curb), building (facades with windows, drawn in 3-D perspective),
vegetation (hedges, street trees, grass), sky (gradient, clouds), pole (lamp posts). Things: car (3-D box: body,
cabin, windows, wheels, lights), person (head, torso, arms, legs), cyclist (a rider on a bicycle, one instance),
traffic sign (post and plates, one instance). Objects are scaled by depth and painted back to front (occlusion);
thing colours are drawn per instance from overlapping ranges, so colour alone does not give the class.
Image effects: texture noise, global brightness and colour cast, cast shadows, haze by depth, anti-aliasing
(2x supersampling), sensor noise, JPEG artefacts. Void (black) pixels: 'unlabelled' clutter on the sidewalk, the ego
vehicle's hood, a rectification border in some images, and thing fragments that occlusion leaves too small to learn.

Format coverage: every 4th annotation (index % 4 == 1) is written at half resolution; every 4th (index % 4 == 2)
stores spread-out uint16 instance ids (segment k gets id 300 * k), as external datasets may; the rest use
`format.encode_annotation` (consecutive ids, the smallest dtype).

Determinism: image `i` of split `s` (0: train, 1: val) is drawn from `numpy.random.default_rng([seed, s, i])` alone,
so the files are byte-identical whatever the number of worker processes.

`ensure_demo_dataset(cache_dir, ...)` generates the dataset into a local cache folder on first use (the demo
config calls it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fcntl
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from panoptic_jax import cli
from panoptic_jax.data import dataset_format as fmt

__all__ = ["INFO", "SPLITS", "GENERATOR_VERSION", "render_scene", "encode_example", "generate", "ensure_demo_dataset"]

# Bump when the rendering changes, so that cached demo datasets are regenerated.
GENERATOR_VERSION = 3
SPLITS = ("train", "val")
_SUPERSAMPLE = 2
_SPREAD_ID_STEP = 300

# Cityscapes colours, so that visualisations look familiar.
_CATEGORIES = (
    ("road", (128, 64, 128), False),
    ("sidewalk", (244, 35, 232), False),
    ("building", (70, 70, 70), False),
    ("vegetation", (107, 142, 35), False),
    ("sky", (70, 130, 180), False),
    ("pole", (153, 153, 153), False),
    ("car", (0, 0, 142), True),
    ("person", (220, 20, 60), True),
    ("cyclist", (255, 0, 0), True),
    ("traffic sign", (220, 220, 0), True),
)
INFO = fmt.DatasetInfo(categories=tuple(c[0] for c in _CATEGORIES), colors=tuple(c[1] for c in _CATEGORIES),
                       is_thing=tuple(c[2] for c in _CATEGORIES))
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, POLE, CAR, PERSON, CYCLIST, SIGN = range(len(_CATEGORIES))
_VOID = fmt.VOID
_SIGN_COLORS = np.array([[210, 30, 30], [30, 70, 190], [240, 240, 240], [240, 200, 30], [30, 130, 60]], np.float32)

# ----------------------------------------------------------------------------------------------------------------------
# Rasterisation: shapes are masks over a clipped window of the (supersampled) canvas.


class _Canvas:
  """RGB float image, canonical label map and depth, painted back to front."""

  def __init__(self, height: int, width: int, noise: np.ndarray):
    self.h, self.w = height, width
    self.rgb = np.zeros((height, width, 3), np.float32)
    self.label = np.full((height, width), _VOID, np.int32)
    self.depth = np.zeros((height, width), np.float32)
    self.noise = noise  # [H, W] in about [-1, 1]: texture for any surface.

  def window(self, x0, y0, x1, y1):
    """Clipped integer window around a float bbox -> (slices, yy [h, 1], xx [1, w]) of pixel centres, or None."""
    x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    x1, y1 = min(int(np.ceil(x1)) + 1, self.w), min(int(np.ceil(y1)) + 1, self.h)
    if x0 >= x1 or y0 >= y1:
      return None
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :]
    return (slice(y0, y1), slice(x0, x1)), yy, xx

  def fill(self, shape, color, label: int | None, depth: float, texture: float = 0.0) -> int:
    """Paints `shape` (from a shape function) with an RGB colour (or [h, w, 3] array); returns its pixel count."""
    if shape is None:
      return 0
    sl, mask = shape
    if not mask.any():
      return 0
    color = np.asarray(color, np.float32)
    if color.ndim > 1:
      color = np.broadcast_to(color, mask.shape + (3,))[mask]
    if texture:
      color = color * (1.0 + texture * self.noise[sl][mask])[:, None]
    self.rgb[sl][mask] = color
    if label is not None:
      self.label[sl][mask] = label
    self.depth[sl][mask] = depth
    return int(mask.sum())

  def shade(self, shape, factor: float) -> None:
    """Darkens (factor < 1) or lightens the pixels of `shape` without changing labels (shadows)."""
    if shape is not None:
      sl, mask = shape
      self.rgb[sl][mask] *= factor


def _polygon(c: _Canvas, pts):
  """Even-odd fill of a simple polygon, pts [(x, y), ...]."""
  pts = np.asarray(pts, np.float32)
  win = c.window(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
  if win is None:
    return None
  sl, yy, xx = win
  inside = np.zeros((yy.shape[0], xx.shape[1]), bool)
  for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, 1, axis=0)):
    if ya == yb:
      continue
    crosses = (ya > yy) != (yb > yy)
    x_at = xa + (yy - ya) * ((xb - xa) / (yb - ya))
    inside ^= crosses & (xx < x_at)
  return sl, inside


def _ellipse(c: _Canvas, cx, cy, rx, ry, inner: float = 0.0):
  """Filled ellipse, or a ring when inner > 0 (inner radius as a fraction of the outer)."""
  rx, ry = max(rx, 0.3), max(ry, 0.3)
  win = c.window(cx - rx, cy - ry, cx + rx, cy + ry)
  if win is None:
    return None
  sl, yy, xx = win
  r2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
  return sl, (r2 <= 1.0) & (r2 >= inner * inner)


def _capsule(c: _Canvas, p0, p1, r):
  """All pixels within r of the segment p0-p1 (limbs, poles, frames)."""
  r = max(r, 0.5)
  (xa, ya), (xb, yb) = p0, p1
  win = c.window(min(xa, xb) - r, min(ya, yb) - r, max(xa, xb) + r, max(ya, yb) + r)
  if win is None:
    return None
  sl, yy, xx = win
  dx, dy = xb - xa, yb - ya
  t = np.clip(((xx - xa) * dx + (yy - ya) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
  return sl, (xx - xa - t * dx) ** 2 + (yy - ya - t * dy) ** 2 <= r * r


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
  """Smooth noise in [-1, 1]: a random grid every `cell` pixels, bilinearly interpolated."""
  grid = rng.uniform(-1, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
  big = Image.fromarray(grid, mode="F").resize((grid.shape[1] * cell, grid.shape[0] * cell), Image.BILINEAR)
  return np.asarray(big)[:height, :width]


# ----------------------------------------------------------------------------------------------------------------------
# Scene


@dataclasses.dataclass
class _Camera:
  """Pinhole camera at height hc above the ground, looking along +Z; X right, Y up (metres); pixels in the canvas."""
  f: float
  cx: float
  hy: float  # horizon row
  hc: float

  def project(self, x, y, z):
    z = np.maximum(z, 0.05)
    return self.cx + self.f * x / z, self.hy + self.f * (self.hc - y) / z

  def quad(self, corners):
    return [self.project(*p) for p in corners]


def _hsv(h, s, v):
  """HSV in [0, 1] -> RGB 0-255."""
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array([r, g, b], np.float32) * 255


def _any_color(rng):
  """A colour from the whole range; things draw from here so colour alone does not give their class."""
  if rng.random() < 0.3:  # greys, white, black
    return np.full(3, rng.uniform(25, 235), np.float32) * rng.uniform(0.93, 1.07, 3)
  return _hsv(rng.random(), rng.uniform(0.25, 0.9), rng.uniform(0.25, 0.95))


class _Scene:
  """Draws one street scene; `things` collects (category, instance, drawn pixel count) for the occlusion check."""

  def __init__(self, rng: np.random.Generator, height: int, width: int):
    self.rng = rng
    self.out_hw = (height, width)
    h, w = height * _SUPERSAMPLE, width * _SUPERSAMPLE
    noise = (0.5 * _value_noise(rng, h, w, 2) + 0.3 * _value_noise(rng, h, w, 8)
             + 0.2 * _value_noise(rng, h, w, 32))
    self.c = _Canvas(h, w, noise)
    self.cam = _Camera(f=w * rng.uniform(0.5, 0.7), cx=w * rng.uniform(0.38, 0.62), hy=h * rng.uniform(0.36, 0.5),
                       hc=rng.uniform(1.3, 1.8))
    # Things are placed no farther than where they appear this small (a fraction of the image height), so that they
    # stay learnable at the demo's resolution (output stride 4); occlusion can still leave smaller fragments.
    self.min_px = 0.3 * h
    # Labelled poles are at least this wide (about 6 image pixels at 128 x 256, 1.5 stride-4 cells: thinner ones
    # even perfect stride-4 predictions lose in the mask-wise merge); farther lamp posts are annotated void.
    self.min_pole_px = 0.045 * h
    self.next_instance = {CAR: 1, PERSON: 1, CYCLIST: 1, SIGN: 1}
    self.things: dict[int, int] = {}  # canonical label -> pixels drawn (before occlusion by later objects)
    self.sun_side = rng.choice([-1, 1])

  def zmax(self, height_m: float, min_fraction: float = 1.0) -> float:
    """The largest depth at which `height_m` metres still appear min_fraction * min_px tall."""
    return self.cam.f * height_m / (self.min_px * min_fraction)

  def new_thing(self, category: int) -> int:
    label = category * INFO.label_divisor + self.next_instance[category]
    self.next_instance[category] += 1
    return label

  # -- layout ------------------------------------------------------------------------------------------------------

  def layout(self):
    rng = self.rng
    n_lanes = int(rng.integers(2, 5))
    self.lane_w = rng.uniform(2.8, 3.6)
    ego_lane = int(rng.integers(0, n_lanes))
    self.road_l = -(ego_lane + rng.uniform(0.3, 0.7)) * self.lane_w
    self.road_r = self.road_l + n_lanes * self.lane_w
    self.n_lanes = n_lanes
    self.wall_l = self.road_l - rng.uniform(1.8, 4.5)
    self.wall_r = self.road_r + rng.uniform(1.8, 4.5)

  def draw(self):
    self.layout()
    self.draw_sky()
    self.draw_skyline()
    self.draw_ground()
    for side in (-1, 1):
      self.draw_facades(side)
    objects = self.place_objects()
    for _, fn, args in sorted(objects, key=lambda o: -o[0]):
      fn(*args)
    if self.rng.random() < 0.2:
      self.draw_hood()

  # -- stuff -------------------------------------------------------------------------------------------------------

  def draw_sky(self):
    c, rng = self.c, self.rng
    overcast = rng.random() < 0.3
    top = np.array([150, 160, 170] if overcast else [rng.uniform(40, 110), rng.uniform(100, 160), 230], np.float32)
    bottom = np.array([205, 210, 215] if overcast else [190, 210, 235], np.float32) * rng.uniform(0.9, 1.05)
    t = np.clip(np.arange(c.h, dtype=np.float32) / max(self.cam.hy, 1.0), 0, 1)[:, None, None]
    sky = top * (1 - t) + bottom * t
    clouds = np.clip(_value_noise(rng, c.h, c.w, 24) * 1.5 + rng.uniform(-0.8, 0.4), 0, 1)[..., None]
    c.rgb[:] = sky * (1 - clouds) + np.float32(235) * clouds
    c.label[:] = SKY * INFO.label_divisor
    c.depth[:] = 0.0  # no haze on the sky

  def draw_skyline(self):
    """Distant buildings and trees along the horizon."""
    c, rng, cam = self.c, self.rng, self.cam
    x = 0.0
    while x < c.w:
      seg = rng.uniform(0.03, 0.12) * c.w
      z = rng.uniform(120, 300)
      hgt = rng.uniform(4, 40)
      top = cam.hy - cam.f * hgt / z
      if rng.random() < 0.7:
        col = np.array([150, 155, 165], np.float32) * rng.uniform(0.7, 1.05)
        c.fill(_polygon(c, [(x, cam.hy + 1), (x + seg, cam.hy + 1), (x + seg, top), (x, top)]), col,
               BUILDING * INFO.label_divisor, z, 0.05)
      else:
        xs = np.linspace(x, x + seg, 7)
        tops = cam.hy - cam.f * (hgt / 3) * rng.uniform(0.5, 1.0, 7) / z
        pts = [(x, cam.hy + 1)] + list(zip(xs, tops)) + [(x + seg, cam.hy + 1)]
        c.fill(_polygon(c, pts), np.array([80, 110, 70], np.float32) * rng.uniform(0.8, 1.1),
               VEGETATION * INFO.label_divisor, z, 0.15)
      x += seg

  def draw_ground(self):
    c, rng, cam = self.c, self.rng, self.cam
    row0 = int(np.floor(cam.hy)) + 1
    ys = np.arange(row0, c.h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(c.w, dtype=np.float32)[None, :] + 0.5
    z = cam.f * cam.hc / (ys - cam.hy)
    x = (xs - cam.cx) * z / cam.f
    z = np.broadcast_to(z, x.shape)
    noise = c.noise[row0:]
    road = (x >= self.road_l) & (x <= self.road_r)
    side = ((x >= self.wall_l) & (x < self.road_l)) | ((x > self.road_r) & (x <= self.wall_r))
    rgb = np.empty(x.shape + (3,), np.float32)
    label = np.full(x.shape, VEGETATION * INFO.label_divisor, np.int32)
    label[road] = ROAD * INFO.label_divisor
    label[side] = SIDEWALK * INFO.label_divisor

    # Grass beyond the sidewalks (seen in gaps between buildings).
    rgb[:] = np.array([70, 120, 45], np.float32) * (1 + 0.25 * noise)[..., None]
    # Asphalt: grey with fine noise, darker tyre tracks.
    asphalt = np.full(3, rng.uniform(65, 115), np.float32) * rng.uniform(0.95, 1.05, 3)
    lane_pos = (x - self.road_l) / self.lane_w
    track = np.abs(np.abs((lane_pos % 1.0) - 0.5) - 0.25) < 0.08
    road_rgb = asphalt * ((1 + 0.15 * noise) * np.where(track, 0.9, 1.0))[..., None]
    # Lane markings: dashed between lanes, solid at the edges, sometimes a crosswalk.
    width = rng.uniform(0.1, 0.2)
    dash_period, dash_len = rng.uniform(6, 12), rng.uniform(2, 4)
    dist_lane = np.abs(lane_pos - np.round(lane_pos)) * self.lane_w
    inner = (np.round(lane_pos) > 0) & (np.round(lane_pos) < self.n_lanes)
    marking = (dist_lane < width) & inner & ((z % dash_period) < dash_len)
    if rng.random() < 0.7:
      marking |= (np.abs(x - self.road_l - 0.3) < width) | (np.abs(x - self.road_r + 0.3) < width)
    if rng.random() < 0.3:
      zc = rng.uniform(5, 20)
      marking |= (z > zc) & (z < zc + 3.5) & (((x - self.road_l) % 1.0) < 0.5) & road
    paint = np.array([235, 235, 225] if rng.random() < 0.8 else [230, 190, 60], np.float32)
    road_rgb = np.where(marking[..., None], paint * (1 + 0.1 * noise)[..., None], road_rgb)
    rgb[road] = road_rgb[road]
    # Sidewalk: tiles, a lighter curb along the road.
    tile = rng.uniform(0.4, 0.8)
    pavers = [np.full(3, rng.uniform(140, 190), np.float32), np.array([180, 125, 110], np.float32),
              np.array([190, 175, 150], np.float32)][int(rng.integers(0, 3))] * rng.uniform(0.85, 1.1)
    joint = ((x / tile) % 1.0 < 0.07) | ((z / tile) % 1.0 < 0.07)
    curb = (np.abs(x - self.road_l) < 0.25) | (np.abs(x - self.road_r) < 0.25)
    side_rgb = pavers * ((1 + 0.1 * noise) * np.where(joint, 0.85, 1.0) * np.where(curb, 1.15, 1.0))[..., None]
    rgb[side] = side_rgb[side]

    # The shadow of the buildings on the sun's far side.
    if rng.random() < 0.6:
      reach = rng.uniform(0.1, 0.7) * (self.road_r - self.road_l)
      shadow = (x < self.road_l + reach) if self.sun_side > 0 else (x > self.road_r - reach)
      rgb[shadow] *= rng.uniform(0.5, 0.75)
    c.rgb[row0:] = rgb
    c.label[row0:] = label
    c.depth[row0:] = z

  def draw_facades(self, side: int):
    """Buildings and hedges along a vertical plane at X = wall, split into segments along Z, far to near."""
    rng = self.rng
    wall = self.wall_l if side < 0 else self.wall_r
    segments, z = [], 0.5
    z_end = rng.uniform(40, 120)
    while z < z_end:
      length = rng.uniform(6, 25)
      segments.append((z, z + length))
      z += length
    lit = 1.0 if side == self.sun_side else rng.uniform(0.6, 0.8)
    for z0, z1 in reversed(segments):
      if rng.random() < 0.75:
        self.draw_building(wall, side, z0, z1, lit)
      else:
        self.draw_hedge(wall, side, z0, z1, lit)

  def draw_building(self, wall, side, z0, z1, lit):
    c, rng, cam = self.c, self.rng, self.cam
    height = rng.uniform(5, 25)
    base = [np.array([200, 190, 170]), np.array([170, 90, 70]), np.array([150, 150, 155]), np.array([220, 215, 200]),
            np.array([120, 120, 130]), np.array([190, 160, 110])][int(rng.integers(0, 6))]
    color = base.astype(np.float32) * rng.uniform(0.75, 1.1, 3) ** 0.5 * lit
    label = BUILDING * INFO.label_divisor
    # The face towards the camera at z0 (seen where nearer buildings are lower), then the facade.
    back = wall + side * 15.0
    c.fill(_polygon(c, cam.quad([(wall, 0, z0), (back, 0, z0), (back, height, z0), (wall, height, z0)])),
           color * 0.85, label, z0, 0.05)
    shape = _polygon(c, cam.quad([(wall, 0, z0), (wall, 0, z1), (wall, height, z1), (wall, height, z0)]))
    if shape is None:
      return
    sl, mask = shape
    # Facade coordinates of each pixel: depth from the column, height from the row.
    xs = (np.arange(sl[1].start, sl[1].stop, dtype=np.float32) + 0.5)[None, :]
    ys = (np.arange(sl[0].start, sl[0].stop, dtype=np.float32) + 0.5)[:, None]
    dx = np.where(np.abs(xs - cam.cx) < 1e-3, 1e-3, xs - cam.cx)
    zz = np.broadcast_to(np.clip(cam.f * wall / dx, 0.05, 1e4), mask.shape)
    yy = cam.hc - (ys - cam.hy) * zz / cam.f
    floor_h, bay = rng.uniform(2.8, 3.6), rng.uniform(2.2, 4.0)
    win_w, win_h = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)
    windows = (((zz - z0) / bay) % 1.0 < win_w) & ((yy / floor_h) % 1.0 > 0.35) & \
              ((yy / floor_h) % 1.0 < 0.35 + win_h) & (yy > floor_h) & (yy < height - 0.8)
    glass = np.array([55, 65, 85], np.float32) * rng.uniform(0.7, 1.3)
    rgb = np.broadcast_to(color, mask.shape + (3,)).copy()
    rgb *= (1 + 0.06 * c.noise[sl])[..., None]
    rgb[(yy > height - 0.5)] *= 0.8  # cornice
    rgb[((zz - z0) < 0.4) | ((z1 - zz) < 0.4)] *= 0.85  # corners
    rgb[windows] = (glass * (1 + 0.3 * c.noise[sl])[..., None])[windows]
    c.fill((sl, mask), rgb, label, 0.0)
    c.depth[sl][mask] = zz[mask]

  def draw_hedge(self, wall, side, z0, z1, lit):
    c, rng, cam = self.c, self.rng, self.cam
    zs = np.linspace(z0, z1, 12)
    tops = rng.uniform(1.5, 8) * rng.uniform(0.6, 1.0, zs.size)
    pts = cam.quad([(wall, 0, z1), (wall, 0, z0)] + [(wall, t, z) for z, t in zip(zs, tops)])
    color = np.array([60, 105, 40], np.float32) * rng.uniform(0.7, 1.2, 3) ** 0.5 * lit
    c.fill(_polygon(c, pts), color, VEGETATION * INFO.label_divisor, 0.5 * (z0 + z1), 0.35)

  # -- objects -----------------------------------------------------------------------------------------------------

  def place_objects(self):
    """Returns [(depth, draw function, args)]; drawn far to near."""
    rng = self.rng
    objs = []
    road_l, road_r = self.road_l, self.road_r

    def sidewalk_x(margin=0.3):
      if rng.random() < 0.5:
        return rng.uniform(self.wall_l + margin, road_l - margin)
      return rng.uniform(road_r + margin, self.wall_r - margin)

    def depth(near, far):  # uniform in apparent size (1 / depth): near and far objects equally often
      return 1.0 / rng.uniform(1.0 / max(far, near + 0.5), 1.0 / near)

    # Cars: parked along the curbs, and driving in lanes.
    car_zmax = self.zmax(1.45, 0.9)
    for curb, sign in ((road_l, 1), (road_r, -1)):
      if rng.random() < 0.6:
        z = rng.uniform(2.5, 8)
        while z < car_zmax:
          length = rng.uniform(3.8, 4.8)
          if rng.random() < 0.7:
            objs.append((z, self.draw_car, (curb + sign * rng.uniform(1.0, 1.3), z, length, rng.random() < 0.5)))
          z += length + rng.uniform(0.8, 6)
    for lane in range(self.n_lanes):
      x = road_l + (lane + 0.5) * self.lane_w + rng.uniform(-0.3, 0.3)
      z = depth(4 if abs(x) > 2 else 7, car_zmax)
      while z < car_zmax and rng.random() < 0.55:
        length = rng.uniform(3.8, 4.8)
        objs.append((z, self.draw_car, (x, z, length, rng.random() < 0.5)))
        z += length + rng.uniform(3, 15)
    # People on the sidewalks, some crossing the road.
    for _ in range(int(rng.integers(0, 6))):
      z = depth(3.5, self.zmax(1.7))
      x = sidewalk_x() if rng.random() < 0.8 else rng.uniform(road_l, road_r)
      objs.append((z, self.draw_person, (x, z)))
    for _ in range(int(rng.poisson(0.8))):
      z = depth(4, self.zmax(1.7))
      x = rng.uniform(road_l + 0.5, road_r - 0.5) if rng.random() < 0.7 else sidewalk_x()
      objs.append((z, self.draw_cyclist, (x, z)))
    for _ in range(int(rng.integers(0, 3))):
      z = depth(4, self.zmax(0.7, 0.5))  # plates of ~0.7 m at least 6% of the image height
      objs.append((z, self.draw_sign, (road_l - 0.5 if rng.random() < 0.5 else road_r + 0.5, z)))
    # Stuff objects: lamp posts, street trees; void clutter.
    for curb, sign in ((road_l, -1), (road_r, 1)):
      if rng.random() < 0.6:
        z, step = rng.uniform(3, 15), rng.uniform(12, 30)
        while z < 50:
          objs.append((z, self.draw_lamp, (curb + sign * 0.4, z)))
          z += step
      if rng.random() < 0.4:
        z, step = rng.uniform(3, 12), rng.uniform(8, 20)
        while z < 60:
          objs.append((z, self.draw_tree, (curb + sign * rng.uniform(1.0, 1.6), z)))
          z += step
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.6 else 0):
      z = rng.uniform(3, 25)
      objs.append((z, self.draw_clutter, (sidewalk_x(0.6), z)))
    if not any(o[1] in (self.draw_car, self.draw_person, self.draw_cyclist) for o in objs):
      z = rng.uniform(min(6.0, car_zmax), car_zmax)  # car_zmax is below 6 m with a long focal length
      objs.append((z, self.draw_car, (road_l + 0.5 * self.lane_w, z, 4.3, True)))
    return objs

  def draw_car(self, x, z, length, rear_view):
    """A 3-D car: body box, cabin with windows, wheels, lights; seen from behind (or front) and one side."""
    c, rng, cam = self.c, self.rng, self.cam
    label = self.new_thing(CAR)
    w = rng.uniform(1.6, 1.95)
    h = rng.uniform(1.35, 1.6) if rng.random() < 0.8 else rng.uniform(1.7, 2.0)
    hl = rng.uniform(0.8, 0.95)  # top of the lower body
    x0, x1, z1 = x - w / 2, x + w / 2, z + length
    color = _any_color(rng)
    glass = np.array([40, 50, 60], np.float32) * rng.uniform(0.8, 1.5)
    tire = np.array([25, 25, 28], np.float32)
    inset = 0.12
    cx0, cx1 = x0 + inset, x1 - inset
    cz0, cz1 = z + rng.uniform(0.5, 1.0), z1 - rng.uniform(0.8, 1.3)
    sun = 1.0 if np.sign(x) != self.sun_side else 0.75
    drawn = 0
    # Shadow on the ground.
    c.shade(_polygon(c, cam.quad([(x0 - 0.1, 0, z - 0.2), (x1 + 0.1, 0, z - 0.2), (x1 + 0.1, 0, z1 + 0.2),
                                  (x0 - 0.1, 0, z1 + 0.2)])), 0.45)
    drawn += c.fill(_polygon(c, cam.quad([(x0, hl, z), (x1, hl, z), (x1, hl, z1), (x0, hl, z1)])), color * 1.1,
                    label, z, 0.04)
    side_x = x0 if x0 > 0 else x1 if x1 < 0 else None
    if side_x is not None:
      drawn += c.fill(_polygon(c, cam.quad([(side_x, 0.25, z), (side_x, hl, z), (side_x, hl, z1),
                                           (side_x, 0.25, z1)])), color * 0.85 * sun, label, z, 0.04)
      for za in (z + 0.8, z1 - 0.8):
        (px, _), (qx, _) = cam.project(side_x, 0.33, za - 0.33), cam.project(side_x, 0.33, za + 0.33)
        _, top = cam.project(side_x, 0.66, za)
        cxw, cyw = cam.project(side_x, 0.33, za)
        drawn += c.fill(_ellipse(c, cxw, cyw, abs(qx - px) / 2, abs(cyw - top)), tire, label, za)
        c.fill(_ellipse(c, cxw, cyw, abs(qx - px) / 4, abs(cyw - top) / 2), [120, 120, 125], label, za)
      side_c = cx0 if side_x == x0 else cx1
      drawn += c.fill(_polygon(c, cam.quad([(side_c, hl, cz0 - 0.4), (side_c, h, cz0), (side_c, h, cz1),
                                           (side_c, hl, cz1 + 0.5)])), color * 0.8 * sun, label, z, 0.04)
      c.fill(_polygon(c, cam.quad([(side_c, hl + 0.1, cz0 - 0.2), (side_c, h - 0.08, cz0 + 0.1),
                                   (side_c, h - 0.08, cz1 - 0.1), (side_c, hl + 0.1, cz1 + 0.3)])), glass * 0.9,
             label, z, 0.2)
    drawn += c.fill(_polygon(c, cam.quad([(cx0, h, cz0), (cx1, h, cz0), (cx1, h, cz1), (cx0, h, cz1)])),
                    color * 1.15, label, z, 0.04)
    # Rear (or front) window on the sloping cabin face, then the rear face of the body.
    drawn += c.fill(_polygon(c, cam.quad([(cx0, hl, cz0 - 0.4), (cx1, hl, cz0 - 0.4), (cx1, h, cz0),
                                         (cx0, h, cz0)])), color, label, z)
    c.fill(_polygon(c, cam.quad([(cx0 + 0.08, hl + 0.08, cz0 - 0.35), (cx1 - 0.08, hl + 0.08, cz0 - 0.35),
                                 (cx1 - 0.08, h - 0.06, cz0 - 0.02), (cx0 + 0.08, h - 0.06, cz0 - 0.02)])), glass,
           label, z, 0.2)
    for wx in (x0 + 0.05, x1 - 0.3):
      drawn += c.fill(_polygon(c, cam.quad([(wx, 0, z + 0.5), (wx + 0.25, 0, z + 0.5), (wx + 0.25, 0.3, z + 0.5),
                                           (wx, 0.3, z + 0.5)])), tire, label, z)
    drawn += c.fill(_polygon(c, cam.quad([(x0, 0.22, z), (x1, 0.22, z), (x1, hl, z), (x0, hl, z)])), color, label, z,
                    0.04)
    c.fill(_polygon(c, cam.quad([(x0, 0.22, z), (x1, 0.22, z), (x1, 0.38, z), (x0, 0.38, z)])), color * 0.5, label, z)
    lights = [230, 30, 30] if rear_view else [240, 240, 210]
    for lx in (x0 + 0.05, x1 - 0.3):
      c.fill(_polygon(c, cam.quad([(lx, hl - 0.2, z), (lx + 0.25, hl - 0.2, z), (lx + 0.25, hl - 0.05, z),
                                   (lx, hl - 0.05, z)])), lights, label, z)
    c.fill(_polygon(c, cam.quad([(x - 0.25, 0.42, z), (x + 0.25, 0.42, z), (x + 0.25, 0.55, z),
                                 (x - 0.25, 0.55, z)])), [235, 235, 235], label, z)
    self.things[label] = self.things.get(label, 0) + drawn

  def _figure(self, x, z):
    """For figures standing at (x, 0, z): a map (u right, v up, metres from the feet) -> canvas pixels, and the
    scale in pixels per metre."""
    fx, fy = self.cam.project(x, 0, z)
    s = self.cam.f / z
    return (lambda u, v: (fx + u * s, fy - v * s)), s

  def draw_person(self, x, z):
    c, rng = self.c, self.rng
    label = self.new_thing(PERSON)
    hp = rng.uniform(1.5, 1.95)
    p, s = self._figure(x, z)
    facing = rng.choice([-1, 0, 1])  # 0: towards / away from the camera, +-1: walking sideways
    width = 1.0 if facing == 0 else 0.65
    stride = rng.uniform(0.0, 0.25) * (1 if facing else 0.3)
    skin = np.array([[240, 200, 170], [200, 150, 110], [140, 95, 65], [90, 60, 40]][int(rng.integers(0, 4))],
                    np.float32)
    shirt, pants = _any_color(rng), _any_color(rng) * 0.7
    hair = np.array([[30, 25, 20], [90, 60, 30], [200, 170, 100], [150, 150, 150]][int(rng.integers(0, 4))],
                    np.float32)
    drawn = 0
    c.shade(_ellipse(c, *p(0, 0), 0.35 * s, 0.08 * s), 0.6)
    hip = 0.48 * hp
    for sgn in (-1, 1):
      foot = (sgn * 0.1 * width + sgn * stride * (facing != 0), 0.04)
      drawn += c.fill(_capsule(c, p(sgn * 0.09 * width, hip), p(*foot), 0.09 * s), pants, label, z, 0.1)
      drawn += c.fill(_ellipse(c, *p(foot[0] + 0.04 * facing, 0.03), 0.08 * s, 0.04 * s), [30, 30, 30], label, z)
    if rng.random() < 0.2:  # skirt / coat
      drawn += c.fill(_polygon(c, [p(-0.17 * width, hip + 0.05), p(0.17 * width, hip + 0.05),
                                   p(0.25 * width, hip - 0.25), p(-0.25 * width, hip - 0.25)]), shirt * 0.8,
                      label, z, 0.1)
    shoulder = 0.8 * hp
    drawn += c.fill(_polygon(c, [p(-0.2 * width, shoulder), p(0.2 * width, shoulder), p(0.16 * width, hip),
                                 p(-0.16 * width, hip)]), shirt, label, z, 0.1)
    for sgn in (-1, 1):
      swing = sgn * stride * 0.8 * (facing != 0)
      hand = (sgn * 0.24 * width + swing, hip - 0.02)
      drawn += c.fill(_capsule(c, p(sgn * 0.19 * width, shoulder - 0.03), p(*hand), 0.065 * s), shirt * 0.9,
                      label, z, 0.1)
      drawn += c.fill(_ellipse(c, *p(*hand), 0.045 * s, 0.05 * s), skin, label, z)
    drawn += c.fill(_capsule(c, p(0, shoulder - 0.02), p(0, shoulder + 0.06), 0.05 * s), skin, label, z)
    head = (0.02 * facing, 0.91 * hp)
    drawn += c.fill(_ellipse(c, *p(*head), 0.095 * s, 0.115 * s), skin, label, z)
    c.fill(_ellipse(c, *p(head[0] - 0.02 * facing, head[1] + 0.04), 0.1 * s, 0.085 * s), hair, label, z)
    if rng.random() < 0.25:  # backpack or bag
      drawn += c.fill(_polygon(c, [p(-0.15, shoulder - 0.05), p(0.15, shoulder - 0.05), p(0.14, hip + 0.1),
                                   p(-0.14, hip + 0.1)]) if facing == 0 else
                      _ellipse(c, *p(-0.22 * facing, hip + 0.2), 0.1 * s, 0.15 * s), _any_color(rng), label, z)
    self.things[label] = self.things.get(label, 0) + drawn

  def draw_cyclist(self, x, z):
    """A rider on a bicycle, side view; the bicycle and the rider are one `cyclist` instance."""
    c, rng = self.c, self.rng
    label = self.new_thing(CYCLIST)
    p, s = self._figure(x, z)
    d = rng.choice([-1, 1])
    frame = _any_color(rng)
    tire = [25, 25, 25]
    rider, pants = _any_color(rng), _any_color(rng) * 0.7
    skin = np.array([[240, 200, 170], [200, 150, 110], [140, 95, 65]][int(rng.integers(0, 3))], np.float32)
    r = 0.34
    rear, front = (-0.52 * d, r), (0.52 * d, r)
    seat, bb, head_tube, bar = (-0.22 * d, 0.88), (0.0, 0.3), (0.38 * d, 0.85), (0.42 * d, 0.98)
    drawn = 0
    c.shade(_ellipse(c, *p(0, 0), 0.9 * s, 0.07 * s), 0.6)
    for wc in (rear, front):
      drawn += c.fill(_ellipse(c, *p(*wc), r * s, r * s, inner=0.45), tire, label, z)
      c.fill(_capsule(c, p(wc[0] - 0.2, wc[1]), p(wc[0] + 0.2, wc[1]), 0.008 * s), [150, 150, 150], None, z)
    far_leg = [(seat[0] + 0.05 * d, seat[1]), (0.15 * d, 0.62), (-0.08 * d, 0.22)]
    drawn += c.fill(_capsule(c, p(*far_leg[0]), p(*far_leg[1]), 0.065 * s), pants * 0.8, label, z)
    drawn += c.fill(_capsule(c, p(*far_leg[1]), p(*far_leg[2]), 0.055 * s), pants * 0.8, label, z)
    for a, b in ((rear, seat), (seat, bb), (bb, rear), (seat, head_tube), (head_tube, bb), (head_tube, front),
                 (head_tube, bar)):
      drawn += c.fill(_capsule(c, p(*a), p(*b), 0.06 * s), frame, label, z)
    drawn += c.fill(_capsule(c, p(seat[0] - 0.08 * d, seat[1] + 0.03), p(seat[0] + 0.08 * d, seat[1] + 0.03),
                             0.03 * s), [30, 30, 30], label, z)
    hip = (seat[0], seat[1] + 0.08)
    shoulder = (0.12 * d, 1.42)
    near_leg = [(0.22 * d, 0.55), (0.12 * d, 0.38)]
    drawn += c.fill(_capsule(c, p(*hip), p(*near_leg[0]), 0.07 * s), pants, label, z, 0.1)
    drawn += c.fill(_capsule(c, p(*near_leg[0]), p(*near_leg[1]), 0.06 * s), pants, label, z, 0.1)
    drawn += c.fill(_polygon(c, [p(hip[0] - 0.12 * d, hip[1]), p(hip[0] + 0.12 * d, hip[1]),
                                 p(shoulder[0] + 0.1 * d, shoulder[1]), p(shoulder[0] - 0.1 * d, shoulder[1] + 0.04)]),
                    rider, label, z, 0.1)
    drawn += c.fill(_capsule(c, p(*shoulder), p(*bar), 0.05 * s), rider * 0.9, label, z)
    head = (shoulder[0] + 0.1 * d, 1.62)
    drawn += c.fill(_ellipse(c, *p(*head), 0.1 * s, 0.115 * s), skin, label, z)
    if rng.random() < 0.6:  # helmet
      c.fill(_ellipse(c, *p(head[0] - 0.01 * d, head[1] + 0.05), 0.12 * s, 0.08 * s), _any_color(rng), label, z)
    self.things[label] = self.things.get(label, 0) + drawn

  def draw_sign(self, x, z):
    """A traffic sign: its post and one or two plates, one instance."""
    c, rng, cam = self.c, self.rng, self.cam
    label = self.new_thing(SIGN)
    top = rng.uniform(2.2, 3.2)
    s = cam.f / z
    drawn = c.fill(_capsule(c, cam.project(x, 0, z), cam.project(x, top, z), 0.09 * s), [140, 140, 145], label, z)
    n_plates = 1 if rng.random() < 0.75 else 2
    y = top
    for _ in range(n_plates):
      size = rng.uniform(0.55, 0.85)
      px, py = cam.project(x, y - size / 2, z)
      half = size / 2 * s
      kind = int(rng.integers(0, 5))
      rim, face = _SIGN_COLORS[rng.integers(0, 5, 2)]
      if kind == 0:  # round
        drawn += c.fill(_ellipse(c, px, py, half, half), rim, label, z)
        c.fill(_ellipse(c, px, py, half * 0.75, half * 0.75), face, label, z)
      elif kind == 1:  # triangle, point up or down
        k = 1 if rng.random() < 0.7 else -1
        tri = [(px - half, py + k * half * 0.8), (px + half, py + k * half * 0.8), (px, py - k * half)]
        drawn += c.fill(_polygon(c, tri), rim, label, z)
        c.fill(_polygon(c, [(px + (tx - px) * 0.65, py + (ty - py) * 0.65) for tx, ty in tri]), face, label, z)
      elif kind == 2:  # octagon
        ang = np.pi / 8 + np.arange(8) * np.pi / 4
        drawn += c.fill(_polygon(c, np.stack([px + half * np.cos(ang), py + half * np.sin(ang)], 1)), rim, label, z)
      elif kind == 3:  # square / diamond
        r = half if rng.random() < 0.5 else half * 0.8
        pts = [(px, py - r), (px + r, py), (px, py + r), (px - r, py)] if r == half else \
              [(px - r, py - r), (px + r, py - r), (px + r, py + r), (px - r, py + r)]
        drawn += c.fill(_polygon(c, pts), rim, label, z)
      else:  # direction board, wider than tall
        drawn += c.fill(_polygon(c, [(px - 1.6 * half, py - 0.6 * half), (px + 1.6 * half, py - 0.6 * half),
                                    (px + 1.6 * half, py + 0.6 * half), (px - 1.6 * half, py + 0.6 * half)]),
                       face, label, z)
        c.fill(_capsule(c, (px - 1.1 * half, py), (px + 1.1 * half, py), 0.1 * half), [240, 240, 240], label, z)
      y -= size + 0.1
    self.things[label] = self.things.get(label, 0) + drawn

  def draw_lamp(self, x, z):
    c, cam = self.c, self.cam
    top = 6.5
    s = cam.f / z
    color = [110, 110, 115]
    radius = 0.14
    label = POLE * INFO.label_divisor if 2 * radius * s >= self.min_pole_px else _VOID
    c.fill(_capsule(c, cam.project(x, 0, z), cam.project(x, top, z), radius * s), color, label, z, 0.05)
    # The thin arm and the lamp head are annotated void: only the post is a learnable pole at output stride 4.
    arm = x + (1.2 if x < 0 else -1.2)
    c.fill(_capsule(c, cam.project(x, top, z), cam.project(arm, top + 0.2, z), 0.05 * s), color, _VOID, z)
    c.fill(_ellipse(c, *cam.project(arm, top + 0.1, z), 0.25 * s, 0.08 * s), [200, 200, 190], _VOID, z)

  def draw_tree(self, x, z):
    c, rng, cam = self.c, self.rng, self.cam
    s = cam.f / z
    label = VEGETATION * INFO.label_divisor  # trunks count as vegetation, as in Cityscapes
    trunk_h = rng.uniform(1.8, 3)
    c.fill(_capsule(c, cam.project(x, 0, z), cam.project(x, trunk_h + 0.5, z), 0.12 * s), [90, 65, 45], label, z,
           0.2)
    green = np.array([55, 100, 35], np.float32) * rng.uniform(0.7, 1.3, 3) ** 0.5
    for _ in range(int(rng.integers(3, 7))):
      u, v = rng.uniform(-1.2, 1.2), trunk_h + rng.uniform(0.5, 2.5)
      c.fill(_ellipse(c, *cam.project(x + u, v, z), rng.uniform(0.8, 1.5) * s, rng.uniform(0.7, 1.3) * s),
             green * rng.uniform(0.85, 1.15), label, z, 0.4)

  def draw_clutter(self, x, z):
    """Unlabelled things on the sidewalk (bins, boxes, debris): annotated void."""
    c, rng, cam = self.c, self.rng, self.cam
    s = cam.f / z
    px, py = cam.project(x, 0, z)
    w, h = rng.uniform(0.4, 1.0) * s, rng.uniform(0.4, 1.1) * s
    ang = np.linspace(0, 2 * np.pi, 9)[:-1]
    radius = rng.uniform(0.6, 1.0, 8)
    pts = np.stack([px + w / 2 * radius * np.cos(ang), py - h / 2 - h / 2 * radius * np.sin(ang)], 1)
    c.fill(_polygon(c, pts), _any_color(rng) * 0.8, _VOID, z, 0.2)

  def draw_hood(self):
    """The ego vehicle's bonnet at the bottom of the image: void, as in Cityscapes."""
    c, rng = self.c, self.rng
    top = c.h * rng.uniform(0.86, 0.94)
    xs = np.linspace(0, c.w, 17)
    ys = top + (c.h - top) * 0.8 * ((xs - c.w / 2) / (c.w / 2)) ** 2
    pts = list(zip(xs, ys)) + [(c.w, c.h), (0, c.h)]
    shape = _polygon(c, pts)
    if shape is not None:
      sl, mask = shape
      grad = np.linspace(0.6, 1.0, mask.shape[0], dtype=np.float32)[:, None, None]
      c.fill(shape, _any_color(rng) * 0.5 * grad, _VOID, 0.5, 0.05)


def render_scene(rng: np.random.Generator, height: int = 128, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Draws one street scene.

  Returns:
    image: uint8 [height, width, 3] RGB (with sensor noise, before JPEG compression).
    panoptic: int32 [height, width] canonical map (`category * INFO.label_divisor + instance`, `format.VOID`).
  """
  scene = _Scene(rng, height, width)
  scene.draw()
  c, ss = scene.c, _SUPERSAMPLE
  # Haze by depth (the sky has depth 0 and stays as drawn).
  visibility = rng.uniform(100, 500)
  haze = np.array([200, 205, 210], np.float32) * rng.uniform(0.9, 1.05)
  t = np.exp(-c.depth / visibility)[..., None]
  rgb = c.rgb * t + haze * (1 - t)
  # Global lighting: brightness, colour cast, contrast.
  rgb = rgb * rng.uniform(0.65, 1.25) * rng.uniform(0.88, 1.12, 3).astype(np.float32)
  rgb = (rgb - 128) * rng.uniform(0.85, 1.15) + 128
  # Anti-aliased image and a label sampled at one sub-pixel per output pixel.
  rgb = rgb.reshape(height, ss, width, ss, 3).mean((1, 3))
  panoptic = c.label[ss // 2::ss, ss // 2::ss].copy()
  # A rectification border in some images: black and void.
  if rng.random() < 0.15:
    b = int(rng.integers(1, 4))
    for sl in ((slice(None), slice(0, b)), (slice(None), slice(width - b, None)), (slice(height - b, None),)):
      rgb[sl] = 0
      panoptic[sl] = _VOID
  rgb += rng.normal(0, rng.uniform(1, 5), rgb.shape).astype(np.float32)
  image = np.clip(np.round(rgb), 0, 255).astype(np.uint8)

  # Thing fragments that occlusion leaves too small to learn become void; then renumber instances 1..K.
  drawn_area = {k: v / ss**2 for k, v in scene.things.items()}
  min_area = 6e-4 * height * width  # 20 pixels at 128 x 256
  values, areas = np.unique(panoptic, return_counts=True)
  out = panoptic.copy()
  kept = {}  # category -> things kept so far
  for value, area in zip(values.tolist(), areas.tolist()):
    category = value // INFO.label_divisor
    if value == _VOID or not INFO.is_thing[category]:
      continue
    if area < min_area or area < 0.1 * drawn_area.get(value, 0):
      out[panoptic == value] = _VOID
    else:
      kept[category] = kept.get(category, 0) + 1
      out[panoptic == value] = category * INFO.label_divisor + kept[category]
  return image, out


# ----------------------------------------------------------------------------------------------------------------------
# Files


def encode_example(seed: int, split: str, index: int, height: int = 128, width: int = 256
                   ) -> tuple[str, bytes, bytes, dict]:
  """Renders and encodes example `index` of `split`: (stem, JPEG bytes, TIFF bytes, stats)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  image, panoptic = render_scene(rng, height, width)
  jpeg = fmt.encode_image(image, ".jpg", quality=int(rng.integers(60, 96)))
  if index % 4 == 1:
    tiff = fmt.encode_annotation(panoptic, INFO, downscale=2)
  elif index % 4 == 2:
    tiff = fmt.encode_annotation(panoptic, INFO, id_step=_SPREAD_ID_STEP)
  else:
    tiff = fmt.encode_annotation(panoptic, INFO)
  values = np.unique(panoptic)
  stats = {"things": int(sum(1 for v in values if v != _VOID and INFO.is_thing[v // INFO.label_divisor])),
           "void_fraction": float((panoptic == _VOID).mean())}
  return f"{index:06d}", jpeg, tiff, stats


_WORKER_STORAGE = {}


def _split_storage(out: str, split: str, endpoint_url: str | None):
  from panoptic_jax.data import storage  # Imported late: workers and callers that only render do not need fsspec.
  key = (out, split, endpoint_url)
  if key not in _WORKER_STORAGE:
    _WORKER_STORAGE[key] = storage.open_storage(f"{out.rstrip('/')}/{split}", endpoint_url=endpoint_url)
  return _WORKER_STORAGE[key]


def _write_example(args) -> dict:
  out, endpoint_url, seed, split, index, height, width = args
  stem, jpeg, tiff, stats = encode_example(seed, split, index, height, width)
  store = _split_storage(out, split, endpoint_url)
  store.write_bytes(f"images/{stem}.jpg", jpeg)
  store.write_bytes(f"{INFO.annotations}/{stem}.tif", tiff)
  return stats


def generate(out: str, num_train: int, num_val: int, seed: int = 0, height: int = 128, width: int = 256,
             endpoint_url: str | None = None, num_workers: int | None = None, progress: bool = True) -> dict:
  """Writes the train and val datasets under `out` (a folder or s3://bucket/prefix); returns summary statistics.

  Each split's metadata.yaml is written after all its files. `num_workers` processes render in parallel (default:
  the CPUs available; 0 renders in this process); the files do not depend on it.
  """
  if height % 2 or width % 2 or height < 32 or width < 32:
    raise ValueError(f"height and width must be even and >= 32 (half-resolution maps keep the aspect ratio); "
                     f"found {height}x{width}")
  if num_train < 0 or num_val < 0 or seed < 0:
    raise ValueError(f"num_train, num_val and seed must be >= 0; found {num_train}, {num_val}, {seed}")
  if num_workers is None:
    num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  counts = {"train": num_train, "val": num_val}
  tasks = [(out, endpoint_url, seed, split, i, height, width) for split in SPLITS for i in range(counts[split])]
  start = time.perf_counter()
  stats = []
  bar = _progress(len(tasks), progress)
  if num_workers <= 1 or len(tasks) < 8:
    for task in tasks:
      stats.append(_write_example(task))
      bar.update(1)
  else:
    # spawn, not fork: callers (the trainer) may have JAX's threads running.
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      for s in pool.map(_write_example, tasks, chunksize=max(1, min(16, len(tasks) // (4 * num_workers)))):
        stats.append(s)
        bar.update(1)
  bar.close()
  yaml_text = fmt.metadata_yaml(INFO).encode()
  for split in SPLITS:
    _split_storage(out, split, endpoint_url).write_bytes("metadata.yaml", yaml_text)
  seconds = time.perf_counter() - start
  summary = {"images": len(tasks), "seconds": round(seconds, 2), "images_per_second": round(len(tasks) / seconds, 1),
             "mean_things": round(float(np.mean([s["things"] for s in stats])), 2) if stats else 0.0,
             "mean_void_fraction": round(float(np.mean([s["void_fraction"] for s in stats])), 4) if stats else 0.0}
  logging.info("synthetic: wrote %d train + %d val images to %s in %.1f s (%.1f images/s)", num_train, num_val, out,
               seconds, summary["images_per_second"])
  return summary


class _NoBar:
  def update(self, n: int) -> None:
    pass

  def close(self) -> None:
    pass


def _progress(total: int, enabled: bool):
  try:
    from tqdm import tqdm
  except ImportError:  # tqdm is in requirements.txt; a bare environment still renders.
    enabled = False
  if not enabled:
    return _NoBar()
  return tqdm(total=total, desc="synthetic", unit="img", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------------
# Demo cache

_MARKER = "GENERATED.json"


def ensure_demo_dataset(cache_dir: str | os.PathLike, num_train: int = 400, num_val: int = 100, seed: int = 0,
                        size: tuple[int, int] = (128, 256), num_workers: int | None = None) -> str:
  """Returns `cache_dir/synthetic`, generating the dataset there first unless it already holds this exact request.

  The folder holds `train/` and `val/` (two datasets in the format) and GENERATED.json with the parameters and the
  generator version; a different request (or generator version) regenerates it. Generation happens in a temporary
  folder beside it and is renamed into place, under a file lock, so concurrent callers and interrupted runs never
  see a partial dataset.
  """
  cache = pathlib.Path(cache_dir).expanduser().resolve()
  cache.mkdir(parents=True, exist_ok=True)
  target = cache / "synthetic"
  height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
  params = {"version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val), "seed": int(seed),
            "height": height, "width": width}

  def up_to_date() -> bool:
    try:
      return json.loads((target / _MARKER).read_text()) == params
    except (OSError, ValueError):
      return False

  if up_to_date():
    return str(target)
  with open(cache / ".synthetic.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Another process may be generating the same thing: wait for it.
    if up_to_date():
      return str(target)
    logging.info("synthetic: generating the demo dataset %s into %s", params, target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=cache))
    try:
      generate(str(tmp), num_train, num_val, seed, height, width, num_workers=num_workers)
      (tmp / _MARKER).write_text(json.dumps(params, indent=1) + "\n")
      if target.exists():
        old = cache / f".synthetic-old-{os.getpid()}"
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
      tmp.rename(target)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return str(target)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.data.synthetic", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder or s3://bucket/prefix; train/ and val/ are written inside")
  parser.add_argument("--num_train", type=int, default=400)
  parser.add_argument("--num_val", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--endpoint_url", default=None, help="S3-compatible endpoint for s3:// locations")
  parser.add_argument("--num_workers", type=int, default=None, help="processes (default: available CPUs)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    summary = generate(args.out, args.num_train, args.num_val, args.seed, args.height, args.width,
                       args.endpoint_url, args.num_workers)
  except ValueError as e:
    parser.error(str(e))
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  cli.run(main)
