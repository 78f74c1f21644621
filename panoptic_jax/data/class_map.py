"""A label-space bridge: a YAML file mapping another dataset's category names onto ours.

    # cityscapes_from_kitti.yaml: their name -> our name
    road: road
    parking: road          # many-to-one: several of theirs may become one of ours
    rail track: null       # null: void (ignored), as is every category not listed
    "on": on rails         # quote names that YAML would read as something else (on, off, yes, no, 1.5)

    class_map = ClassMap.read("cityscapes_from_kitti.yaml")          # a local path or s3://bucket/key
    index, report = class_map.resolve(their_names, our_names)
    index                 # int64 [len(their_names)]: our index of each of their categories, -1 = void
    report.ignored        # their categories that map to nothing (null or not listed)

Every key must be one of their names and every value one of ours: a misspelt name would otherwise silently turn a
category into void. `resolve` raises ClassMapError naming the file, each bad entry and the names that exist.
`match_by_name` is the bridge without a file: a category keeps its name or becomes void.

Nothing here knows about evaluation or conversion; both use it.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Mapping, Sequence

import numpy as np
import yaml

from panoptic_jax.data.storage import open_storage
from panoptic_jax.errors import UserError

VOID = -1


class ClassMapError(UserError, ValueError):
  """A class map is malformed or does not fit the two label spaces; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class ClassMapReport:
  """How their categories land in ours.

  Attributes:
    mapped: their name -> our name, for their categories that map to one of ours (in their order).
    ignored: their categories that map to nothing (void), in their order.
    unlisted: those of `ignored` that the file does not list (the rest are mapped to null explicitly); by name
      matching: those whose name is not one of ours.
    unreached: our categories that none of theirs maps to, in our order.
  """

  mapped: dict[str, str]
  ignored: tuple[str, ...]
  unlisted: tuple[str, ...]
  unreached: tuple[str, ...]

  def as_dict(self) -> dict:
    return {"mapped": dict(self.mapped), "ignored": list(self.ignored), "unlisted": list(self.unlisted),
            "unreached": list(self.unreached)}


class _UniqueKeyLoader(yaml.SafeLoader):
  """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
  seen: dict = {}
  for key_node, _ in node.value:
    key = loader.construct_object(key_node, deep=deep)
    try:
      first = seen.get(key)
    except TypeError:  # An unhashable key ([a, b]: x); the default constructor reports it.
      break
    if first is not None:
      line = key_node.start_mark.line + 1
      raise yaml.constructor.ConstructorError(None, None, f"{key!r} is listed twice (lines {first} and {line})",
                                              key_node.start_mark)
    seen[key] = key_node.start_mark.line + 1
  return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _name(value, where: str, what: str) -> str | None:
  """A category name read from YAML (a string or an integer, as metadata.yaml allows); None for null."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
    raise ClassMapError(f"{where}: {what} {value!r}: expected a category name (a string; quote names such as 'on', "
                        "'no' or '1.5' that YAML reads otherwise)")
  return str(value)


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """Their category name -> our category name, or None for void.

  Attributes:
    entries: the file's entries in file order.
    where: the file, for messages.
  """

  entries: dict[str, str | None]
  where: str = "class map"

  @classmethod
  def read(cls, location: str | os.PathLike[str], endpoint_url: str | None = None) -> ClassMap:
    """Reads a class map from a local path or s3://bucket/key.

    Raises:
      StorageError: the file cannot be read.
      ClassMapError: it is not a YAML mapping of names to names or null.
    """
    location = os.fspath(location)
    folder, file = posixpath.split(location)  # s3://bucket/a/map.yaml -> (s3://bucket/a, map.yaml).
    data = open_storage(folder or ".", endpoint_url).read_bytes(file)
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ClassMapError(f"{location}: expected UTF-8 YAML text, found undecodable bytes ({e})") from None
    return cls.parse(text, where=location)

  @classmethod
  def parse(cls, text: str, where: str = "class map") -> ClassMap:
    """Parses the YAML text of a class map (plain YAML types only).

    Raises:
      ClassMapError: naming `where`: not YAML, not a non-empty mapping, a key listed twice, or a key or value that is
        not a name (or null, for a value).
    """
    try:
      doc = yaml.load(text, Loader=_UniqueKeyLoader)  # A SafeLoader: plain YAML types only.
    except yaml.YAMLError as e:
      raise ClassMapError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
      raise ClassMapError(f"{where}: expected a mapping 'their name: our name' (our name null for void), found "
                          f"{'an empty file' if doc is None else type(doc).__name__}")
    entries: dict[str, str | None] = {}
    for key, value in doc.items():
      their = _name(key, where, "key")
      if their is None:
        raise ClassMapError(f"{where}: key null: expected a category name")
      if their in entries:  # E.g. 1 and '1'.
        raise ClassMapError(f"{where}: {their!r} is listed twice")
      entries[their] = _name(value, where, f"entry {their!r}: value")
    return cls(entries, where)

  def resolve(self, their_names: Sequence[str], our_names: Sequence[str], their: str = "their categories",
              ours: str = "our categories") -> tuple[np.ndarray, ClassMapReport]:
    """Our index of each of their categories.

    Args:
      their_names: their category names, in their index order.
      our_names: ours, in our index order.
      their, ours: how messages call the two lists (e.g. "the GT's categories").

    Returns:
      (int64 [len(their_names)] our index or -1 for void, the report).

    Raises:
      ClassMapError: naming the file, every entry whose key is not among their names or whose value is not among
        ours, and the names that exist.
    """
    their_names, our_names = [str(n) for n in their_names], [str(n) for n in our_names]
    their_set, our_index = set(their_names), {name: k for k, name in enumerate(our_names)}
    problems = []
    unknown_keys = [k for k in self.entries if k not in their_set]
    if unknown_keys:
      problems.append(f"entries {_entries(self.entries, unknown_keys)}: {_quoted(unknown_keys)} "
                      f"{'is' if len(unknown_keys) == 1 else 'are'} not among {their} {their_names}")
    unknown_values = [k for k, v in self.entries.items() if v is not None and v not in our_index]
    if unknown_values:
      values = list(dict.fromkeys(self.entries[k] for k in unknown_values))
      problems.append(f"entries {_entries(self.entries, unknown_values)}: {_quoted(values)} "
                      f"{'is' if len(values) == 1 else 'are'} not among {ours} {our_names}")
    if problems:
      raise ClassMapError(f"{self.where}: " + "; ".join(problems))
    index = np.array([our_index[self.entries[n]] if self.entries.get(n) is not None else VOID for n in their_names],
                     np.int64)
    return index, _report(their_names, our_names, index, unlisted=[n for n in their_names if n not in self.entries])


def match_by_name(their_names: Sequence[str], our_names: Sequence[str]) -> tuple[np.ndarray, ClassMapReport]:
  """The bridge without a class map: each of their categories becomes ours of the same name, or void.

  Returns:
    (int64 [len(their_names)] our index or -1, the report; `unlisted` = `ignored` = names not among ours).
  """
  their_names, our_names = [str(n) for n in their_names], [str(n) for n in our_names]
  our_index = {name: k for k, name in enumerate(our_names)}
  index = np.array([our_index.get(n, VOID) for n in their_names], np.int64)
  return index, _report(their_names, our_names, index, unlisted=[n for n in their_names if n not in our_index])


def _report(their_names: list[str], our_names: list[str], index: np.ndarray, unlisted: list[str]) -> ClassMapReport:
  reached = set(index[index >= 0].tolist())
  return ClassMapReport(mapped={n: our_names[k] for n, k in zip(their_names, index.tolist()) if k >= 0},
                        ignored=tuple(n for n, k in zip(their_names, index.tolist()) if k < 0),
                        unlisted=tuple(unlisted),
                        unreached=tuple(n for k, n in enumerate(our_names) if k not in reached))


def _entries(entries: Mapping[str, str | None], keys: list[str]) -> str:
  return ", ".join(f"'{k}: {entries[k] if entries[k] is not None else 'null'}'" for k in keys)


def _quoted(names: list) -> str:
  return ", ".join(repr(n) for n in names)
