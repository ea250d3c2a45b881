"""Tests of the benchmark data loaders (no network, tiny files)."""

import gzip
import pathlib

import numpy as np
import pytest

from optax_soaa.benchmarks import data


def _write_idx(path: pathlib.Path, array: np.ndarray, compress: bool) -> None:
  codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
  dtype = np.dtype(np.uint8) if array.dtype == np.uint8 else np.dtype(">i4")
  header = bytes([0, 0, codes[dtype], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  raw = header + array.astype(dtype).tobytes()
  if compress:
    path.write_bytes(gzip.compress(raw))
  else:
    path.write_bytes(raw)


def _fake_fmnist(directory: pathlib.Path, compress: bool = True):
  rng = np.random.default_rng(0)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), np.uint8),
      "train-labels-idx1-ubyte": rng.integers(0, 10, (6,), np.uint8),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), np.uint8),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, (4,), np.uint8),
  }
  directory.mkdir(parents=True, exist_ok=True)
  for stem, a in arrays.items():
    _write_idx(directory / (stem + (".gz" if compress else "")), a, compress)
  return arrays


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(5,), (3, 4, 2)])
def test_read_idx_roundtrip(tmp_path, compress, shape):
  a = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
  path = tmp_path / ("x.idx.gz" if compress else "x.idx")
  _write_idx(path, a, compress)
  np.testing.assert_array_equal(data.read_idx(path), a)


def test_read_idx_big_endian_int32(tmp_path):
  a = np.array([[1, -2], [70000, 3]], np.int32)
  path = tmp_path / "x.idx"
  _write_idx(path, a, compress=False)
  out = data.read_idx(path)
  np.testing.assert_array_equal(out, a)
  assert out.dtype.isnative


def test_read_idx_rejects_truncated_file(tmp_path):
  path = tmp_path / "x.idx"
  _write_idx(path, np.zeros((4, 4), np.uint8), compress=False)
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(ValueError, match="header says shape"):
    data.read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_from_path(tmp_path, compress):
  arrays = _fake_fmnist(tmp_path, compress)
  split = data.load_fashion_mnist(tmp_path)
  assert split.x_train.shape == (6, 28, 28, 1)
  assert split.x_test.shape == (4, 28, 28, 1)
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
  np.testing.assert_allclose(
      split.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255.0,
      rtol=1e-6)
  np.testing.assert_array_equal(split.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_env_var_overrides_default_dir(tmp_path, monkeypatch):
  arrays = _fake_fmnist(tmp_path / "elsewhere")
  monkeypatch.setenv(data.FMNIST_ENV_VAR, str(tmp_path / "elsewhere"))
  assert data.fashion_mnist_dir() == tmp_path / "elsewhere"
  split = data.load_fashion_mnist()
  np.testing.assert_array_equal(split.y_train, arrays["train-labels-idx1-ubyte"])
  # An explicit path still wins over the environment variable.
  assert data.fashion_mnist_dir(tmp_path / "x") == tmp_path / "x"


def test_missing_files_error_names_debian_package(tmp_path, monkeypatch):
  monkeypatch.setenv(data.FMNIST_ENV_VAR, str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError) as err:
    data.load_fashion_mnist()
  message = str(err.value)
  assert "dataset-fashion-mnist" in message
  assert str(tmp_path / "empty") in message
  assert "t10k-labels-idx1-ubyte" in message
  assert data.FMNIST_ENV_VAR in message


def test_missing_single_file_is_named(tmp_path):
  _fake_fmnist(tmp_path)
  (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as err:
    data.load_fashion_mnist(tmp_path)
  assert "train-images" not in str(err.value)


def test_digits_split_fixed_and_scaled():
  a, b = data.load_digits_split(), data.load_digits_split()
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
  assert a.x_train.shape[1] == 64
  assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_lm_byte_splits_from_text_file(tmp_path):
  text = ("def f(x):\n    return x + 1\n" * 50).encode()
  path = tmp_path / "t.txt"
  path.write_bytes(text)
  splits = data.lm_byte_splits(path, val_fraction=0.2)
  assert splits["train"].dtype == np.uint8
  assert splits["train"].size + splits["val"].size == len(text)
  assert splits["val"].size == pytest.approx(0.2 * len(text), abs=1)
  assert bytes(splits["train"]) + bytes(splits["val"]) == text
  capped = data.lm_byte_splits(path, max_bytes=100, val_fraction=0.2)
  assert capped["train"].size == 100 and capped["val"].size == 20


def test_stdlib_bytes_hold_out_whole_files():
  train, val = data.stdlib_text_bytes(max_bytes=200_000, val_every=10)
  assert len(train) == 200_000 and 0 < len(val) <= 20_000
  assert b"def " in train and b"import " in val
  files = data.stdlib_source_files()
  assert files == sorted(files) and all(f.suffix == ".py" for f in files)
  # Every tenth file (in sorted order) goes to the held-out part.
  held_out = files[9].read_bytes()[:200]
  assert held_out and held_out in val
