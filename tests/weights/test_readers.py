"""read_tensors: PyTorch archives, detectron2 pickles, safetensors and .npz, locally and on S3; refused pickles."""

import io
import json
import logging
import os
import pickle
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest

from panoptic_jax.data.storage import StorageError
from panoptic_jax.weights.readers import WRAPPER_KEYS, UnsafeCheckpointError, WeightsFileError, read_tensors


def _torch():
  return pytest.importorskip("torch")


def _torch_bytes(obj, **kwargs) -> bytes:
  torch = _torch()
  buffer = io.BytesIO()
  torch.save(obj, buffer, **kwargs)
  return buffer.getvalue()


def _rezip(data: bytes, rename=lambda name: name, replace=None) -> bytes:
  """The zip `data` with its members renamed and some contents replaced ({new name: bytes})."""
  replace = replace or {}
  out = io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
    for name in source.namelist():
      new = rename(name)
      target.writestr(new, replace.get(new, source.read(name)))
  return out.getvalue()


def _write(tmp_path, name: str, data: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _torch_state_dict():
  torch = _torch()
  torch.manual_seed(0)
  base = torch.randn(6, 5)
  return {
      "conv.weight": torch.randn(4, 3, 3, 3),
      "half": torch.randn(3, 2).half(),
      "bf16": torch.randn(7).bfloat16(),
      "steps": torch.tensor([1, 2, 2 ** 40], dtype=torch.int64),
      "transposed": torch.randn(3, 5).t(),         # Non-contiguous.
      "offset": base[2:, 1:4],                      # Offset into a shared storage, strided rows.
      "shares_base": base[0],                       # The same storage as "offset".
      "scalar": torch.tensor(2.5),
      "mask": torch.tensor([True, False]),
      "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(torch.ones(2)),
  }


def _expected(tensor):
  torch = _torch()
  tensor = tensor.detach()
  return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _assert_matches_torch(arrays, state_dict):
  assert sorted(arrays) == sorted(state_dict)
  for name, tensor in state_dict.items():
    expected = _expected(tensor)
    assert arrays[name].dtype == expected.dtype, name
    assert arrays[name].shape == expected.shape, name
    np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch archives


def test_torch_state_dict_round_trip(tmp_path, caplog):
  sd = _torch_state_dict()
  path = _write(tmp_path, "model.pth", _torch_bytes({"model": sd, "epoch": 3, "arch": "r50"}))
  with caplog.at_level(logging.INFO, logger="absl"):
    arrays = read_tensors(path)
  _assert_matches_torch(arrays, sd)
  assert arrays["half"].dtype == np.float16 and arrays["bf16"].dtype == np.float32
  assert all(a.flags.writeable for a in arrays.values())
  arrays["offset"][0, 0] = 123.0  # Shared in torch, independent copies here.
  assert arrays["shares_base"][1] != 123.0
  assert "'model'" in caplog.text and "ignored keys epoch, arch" in caplog.text


def test_torch_bare_state_dict_other_folder_and_suffixes(tmp_path):
  torch = _torch()
  sd = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()  # OrderedDict, _metadata.
  data = _rezip(_torch_bytes(sd), rename=lambda n: n.replace("archive/", "resnet50_a1/", 1))
  for suffix in (".pt", ".bin", ".weights"):  # The content decides, not the suffix.
    _assert_matches_torch(read_tensors(_write(tmp_path, "w" + suffix, data)), sd)


def test_torch_nested_dicts_and_optimizer_state(tmp_path, caplog):
  torch = _torch()
  model = torch.nn.Linear(2, 3)
  optimizer = torch.optim.Adam(model.parameters())
  model(torch.ones(1, 2)).sum().backward()
  optimizer.step()
  checkpoint = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
  with caplog.at_level(logging.INFO, logger="absl"):
    arrays = read_tensors(_write(tmp_path, "ckpt.pth", _torch_bytes(checkpoint)))
  _assert_matches_torch(arrays, model.state_dict())
  assert "optimizer (with arrays)" in caplog.text and "epoch" in caplog.text
  # No wrapper key: nested dicts are flattened with dots, non-array leaves dropped and counted.
  nested = {"backbone": {"stem": {"w": torch.ones(2)}}, "head": {"b": torch.zeros(1)}, "note": "x", "n": 1}
  with caplog.at_level(logging.INFO, logger="absl"):
    arrays = read_tensors(_write(tmp_path, "nested.pth", _torch_bytes(nested)))
  assert sorted(arrays) == ["backbone.stem.w", "head.b"]
  assert "dropped 2 value(s)" in caplog.text


def test_torch_big_endian_archive(tmp_path):
  sd = {"w": _torch().arange(6, dtype=_torch().float32).reshape(2, 3), "i": _torch().tensor([1, -2])}
  data = _torch_bytes(sd)
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    dtypes = {"0": "<f4", "1": "<i8"}
    swapped = {f"archive/data/{k}": np.frombuffer(archive.read(f"archive/data/{k}"), d).astype(d.replace("<", ">"))
               .tobytes() for k, d in dtypes.items()}
  data = _rezip(data, replace={"archive/byteorder": b"big", **swapped})
  _assert_matches_torch(read_tensors(_write(tmp_path, "be.pth", data)), sd)


def test_torch_view_outside_its_storage_is_refused(tmp_path):
  data = _torch_bytes({"w": _torch().ones(4)})
  path = _write(tmp_path, "short.pth", _rezip(data, replace={"archive/data/0": b"\0" * 8}))  # 2 floats, not 4.
  with pytest.raises(WeightsFileError, match=r"short\.pth.*reaches element 3 of a storage of 2"):
    read_tensors(path)


def test_legacy_torch_format_is_named(tmp_path):
  path = _write(tmp_path, "old.pth", _torch_bytes({"w": _torch().ones(2)}, _use_new_zipfile_serialization=False))
  with pytest.raises(WeightsFileError, match=r"old\.pth: .*legacy torch\.save format.*re-save it with a current torch"):
    read_tensors(path)


# ----------------------------------------------------------------------------------------------------------------------
# detectron2 pickles, safetensors, npz


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_pickle(tmp_path, protocol):
  model = {"backbone.res2.0.conv1.weight": np.random.default_rng(0).normal(size=(8, 4, 1, 1)).astype(np.float32),
           "backbone.res2.0.conv1.norm.running_var": np.arange(8, dtype=np.float64),
           "roi_heads.num_batches": np.int64(7), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
           "labels": np.array(["a", "b"], dtype=object)}  # Not numeric: dropped.
  with open(tmp_path / "model_final.pkl", "wb") as f:
    pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol)
  arrays = read_tensors(str(tmp_path / "model_final.pkl"))
  assert sorted(arrays) == sorted(set(model) - {"labels"})
  for name, array in arrays.items():
    np.testing.assert_array_equal(array, model[name])
    assert array.dtype == np.asarray(model[name]).dtype
    assert array.flags.writeable


def test_caffe2_blobs_pickle(tmp_path):
  blobs = {"conv1_w": np.ones((2, 3), np.float32), "conv1_w_momentum": np.zeros((2, 3), np.float32)}
  arrays = read_tensors(_write(tmp_path, "R-50.pkl", pickle.dumps({"blobs": blobs}, 2)))
  assert sorted(arrays) == sorted(blobs)
  assert "blobs" in WRAPPER_KEYS and "model" in WRAPPER_KEYS and "state_dict" in WRAPPER_KEYS


def _safetensors_by_hand(tensors: dict[str, tuple[str, np.ndarray]], metadata=None) -> bytes:
  header, chunks, offset = {}, [], 0
  if metadata is not None:
    header["__metadata__"] = metadata
  for name, (dtype, array) in tensors.items():
    raw = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def test_safetensors_written_by_hand(tmp_path):
  rng = np.random.default_rng(1)
  bf16 = rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16)
  tensors = {"f64": ("F64", rng.normal(size=3)), "f32": ("F32", rng.normal(size=(2, 3)).astype(np.float32)),
             "f16": ("F16", np.array([1.5, -2], np.float16)), "bf16": ("BF16", bf16),
             "i64": ("I64", np.array([2 ** 40, -1])), "i32": ("I32", np.array([[3]], np.int32)),
             "i16": ("I16", np.array([-7], np.int16)), "i8": ("I8", np.array([-8], np.int8)),
             "u8": ("U8", np.array([255], np.uint8)), "bool": ("BOOL", np.array([True, False])),
             "scalar": ("F32", np.array(4.0, np.float32)), "empty": ("F32", np.zeros((0, 2), np.float32))}
  arrays = read_tensors(_write(tmp_path, "m.safetensors", _safetensors_by_hand(tensors, {"format": "pt"})))
  assert sorted(arrays) == sorted(tensors)
  for name, (_, array) in tensors.items():
    expected = array.astype(np.float32) if name == "bf16" else array
    assert arrays[name].dtype == expected.dtype and arrays[name].shape == expected.shape, name
    np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


def test_safetensors_written_by_the_package(tmp_path):
  torch = _torch()
  safetensors_torch = pytest.importorskip("safetensors.torch")
  sd = {"w": torch.randn(3, 4), "h": torch.randn(2).half(), "b": torch.randn(5, 2).bfloat16(),
        "i": torch.tensor([1, 2]), "m": torch.tensor([True])}
  path = str(tmp_path / "model.safetensors")
  safetensors_torch.save_file(sd, path, metadata={"format": "pt"})
  _assert_matches_torch(read_tensors(path), sd)


def test_safetensors_with_data_outside_the_file(tmp_path):
  data = bytearray(_safetensors_by_hand({"w": ("F32", np.ones(4, np.float32))}))
  path = _write(tmp_path, "bad.safetensors", bytes(data[:-4]))
  with pytest.raises(WeightsFileError, match=r"bad\.safetensors: expected a safetensors file.*'w'.*data_offsets"):
    read_tensors(path)


def test_npz(tmp_path):
  np.savez(tmp_path / "w.npz", a=np.arange(3), **{"b/c": np.ones((2, 2), np.float16)})
  arrays = read_tensors(str(tmp_path / "w.npz"))
  assert sorted(arrays) == ["a", "b/c"] and arrays["b/c"].dtype == np.float16


def test_read_from_s3(s3_root, s3_server):
  fs = s3_server.filesystem()
  fs.pipe_file(f"{s3_root}/weights/m.safetensors", _safetensors_by_hand({"w": ("F32", np.arange(4, dtype="<f4"))}))
  fs.pipe_file(f"{s3_root}/weights/d2.pkl", pickle.dumps({"model": {"x": np.ones(2)}}, 2))
  arrays = read_tensors(f"s3://{s3_root}/weights/m.safetensors", endpoint_url=s3_server.endpoint_url)
  np.testing.assert_array_equal(arrays["w"], np.arange(4, dtype=np.float32))
  assert sorted(read_tensors(f"s3://{s3_root}/weights/d2.pkl")) == ["x"]  # Endpoint from the environment.
  with pytest.raises(StorageError, match=rf"s3://{s3_root}/weights/missing\.pth"):
    read_tensors(f"s3://{s3_root}/weights/missing.pth")


# ----------------------------------------------------------------------------------------------------------------------
# Refused and broken files


class _RunsCommand:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _StartsProcess:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return subprocess.Popen, (["sh", "-c", self.command],)


class _Evaluates:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return eval, (f"__import__('os').system({self.command!r})",)


@pytest.mark.parametrize("payload, refused", [
    (_RunsCommand, r"(posix|os)\.system"), (_StartsProcess, r"subprocess\.Popen"), (_Evaluates, r"builtins\.eval")])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, refused, protocol):
  marker = tmp_path / "MARKER"
  malicious = pickle.dumps({"model": {"w": np.ones(2)}, "x": payload(f"touch {marker}")}, protocol)
  torch_like = io.BytesIO()
  with zipfile.ZipFile(torch_like, "w") as archive:
    archive.writestr("archive/data.pkl", malicious)
    archive.writestr("archive/byteorder", "little")
  for name, data in (("evil.pkl", malicious), ("evil.pth", torch_like.getvalue())):
    path = _write(tmp_path, name, data)
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}: refused to load the global {refused}"):
      read_tensors(path)
  assert not marker.exists()


def test_python2_builtins_are_refused(tmp_path):
  marker = tmp_path / "MARKER"
  source = f"import os; os.system('touch {marker}')"
  data = b"\x80\x02c__builtin__\nexec\nX" + len(source).to_bytes(4, "little") + source.encode() + b"\x85R."
  with pytest.raises(UnsafeCheckpointError, match=r"refused to load the global builtins\.exec \(written as __builtin__\.exec\)"):
    read_tensors(_write(tmp_path, "evil.pkl", data))
  assert not marker.exists()


def test_broken_files_name_the_file(tmp_path):
  cases = {
      "empty.pth": (b"", r"found an empty file"),
      "random.pth": (bytes(range(200, 256)), r"found 56 bytes starting b'\\xc8\\xc9"),
      "other.zip": (_rezip_from({"readme.txt": b"hi", "x/data.bin": b""}), r"found a zip with members \[readme\.txt, "
                    r"x/data\.bin\]"),
      "cut.pkl": (pickle.dumps({"model": {"w": np.ones(3)}}, 2)[:40], r"expected a pickle of named arrays, found one "
                  r"that cannot be read"),
      "nothing.pkl": (pickle.dumps({"epoch": 3, "name": "x"}, 2), r"expected named arrays, found none \(2 other"),
      "list.pkl": (pickle.dumps([np.ones(2)], 2), r"expected a dict of named arrays, found a list"),
  }
  buffer = io.BytesIO()
  np.savez(buffer, a=np.ones(100))
  cases["truncated.npz"] = (buffer.getvalue()[:60], r"found a zip that cannot be read, truncated or corrupt")
  for name, (data, message) in cases.items():
    path = _write(tmp_path, name, data)
    with pytest.raises(WeightsFileError, match=rf"{name}: .*{message}"):
      read_tensors(path)
  with pytest.raises(StorageError, match=r"missing\.pth: expected a readable file, found nothing there"):
    read_tensors(str(tmp_path / "missing.pth"))


def test_truncated_torch_archive(tmp_path):
  data = _torch_bytes({"w": _torch().ones(1000)})
  path = _write(tmp_path, "cut.pth", data[: len(data) // 2])
  with pytest.raises(WeightsFileError, match=r"cut\.pth: expected a PyTorch checkpoint or \.npz.*truncated or corrupt"):
    read_tensors(path)


def _rezip_from(members: dict[str, bytes]) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return out.getvalue()


def test_allowed_builders_refuse_harmful_arguments(tmp_path):
  huge_bytearray = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R."  # bytearray(2 ** 30)
  other_codec = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
  for name, data in (("huge.pkl", huge_bytearray), ("codec.pkl", other_codec)):
    with pytest.raises(WeightsFileError, match=rf"{name}: expected a pickle of named arrays"):
      read_tensors(_write(tmp_path, name, data))
