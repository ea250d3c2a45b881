"""Data sources of the benchmark tasks. Nothing here downloads anything.

* ``load_digits_split``: scikit-learn's embedded 8x8 digits, fixed split.
* ``load_fashion_mnist``: Fashion-MNIST from IDX files on disk (the Debian
  package ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist/``; ``OPTAX_SOAA_FMNIST_DIR`` or the
  ``path`` argument points elsewhere).
* ``stdlib_text_bytes`` / ``lm_byte_splits``: bytes of the Python standard
  library's ``.py`` sources (or any text file) for the byte-level LM, split
  into a training and a held-out part.
"""

import gzip
import os
import pathlib
import sysconfig
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

FMNIST_ENV_VAR = "OPTAX_SOAA_FMNIST_DIR"
FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Split(NamedTuple):
  """A supervised train/test split of numpy arrays."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Split:
  """scikit-learn's digits (1797 8x8 images), pixels scaled to [0, 1].

  The split is fixed by `seed` (stratified), so every run sees the same one.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  return Split(x_train, y_train, x_test, y_test)


def read_idx(path: os.PathLike | str) -> np.ndarray:
  """Reads one IDX file (optionally gzip-compressed) into a numpy array."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic number).")
  type_code, ndim = raw[2], raw[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}.")
  dtype = np.dtype(_IDX_DTYPES[type_code])
  header_end = 4 + 4 * ndim
  shape = tuple(
      int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
  )
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header_end != expected:
    raise ValueError(
        f"{path}: header says shape {shape} ({expected} bytes of data), file"
        f" holds {len(raw) - header_end}."
    )
  data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def fashion_mnist_dir(path: Optional[os.PathLike | str] = None) -> pathlib.Path:
  """The directory read: `path`, else $OPTAX_SOAA_FMNIST_DIR, else Debian's."""
  if path is not None:
    return pathlib.Path(path)
  return pathlib.Path(os.environ.get(FMNIST_ENV_VAR) or FMNIST_DEFAULT_DIR)


def _find_idx(directory: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
  for name in (stem + ".gz", stem):
    candidate = directory / name
    if candidate.is_file():
      return candidate
  return None


def load_fashion_mnist(path: Optional[os.PathLike | str] = None) -> Split:
  """Fashion-MNIST as float32 images (N, 28, 28, 1) in [0, 1] and int32 labels.

  Pixels are divided by 255 and not normalised further, as the arTuRO
  authors' data pipeline does.

  Args:
    path: directory with the four IDX files (``.gz`` or not). Default: the
      environment variable ``OPTAX_SOAA_FMNIST_DIR`` if set, else
      ``/usr/share/datasets/fashion-mnist``.

  Raises:
    FileNotFoundError: naming the missing files, the directory searched and
      the Debian package that provides them.
  """
  directory = fashion_mnist_dir(path)
  found = {k: _find_idx(directory, stem) for k, stem in _FMNIST_FILES.items()}
  missing = [_FMNIST_FILES[k] for k, v in found.items() if v is None]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {directory}: missing "
        f"{', '.join(m + '[.gz]' for m in missing)}. Install the Debian package"
        f" `{FMNIST_DEBIAN_PACKAGE}` (apt-get install {FMNIST_DEBIAN_PACKAGE}),"
        f" or point ${FMNIST_ENV_VAR} (or --data-dir) at a directory holding"
        " the four IDX files."
    )
  arrays = {k: read_idx(v) for k, v in found.items()}

  def images(a):
    return (a.astype(np.float32) / 255.0)[..., None]

  return Split(
      images(arrays["train_images"]),
      arrays["train_labels"].astype(np.int32),
      images(arrays["test_images"]),
      arrays["test_labels"].astype(np.int32),
  )


def stdlib_source_files() -> list[pathlib.Path]:
  """The standard library's top-level-and-package `.py` files, sorted."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for p in sorted(root.rglob("*.py")):
    rel = p.relative_to(root).parts
    # Third-party packages and the test suite are not "the standard library's
    # sources" a user would recognise; they also vary between installations.
    if rel[0] in ("site-packages", "dist-packages", "test", "idlelib"):
      continue
    files.append(p)
  return files


def stdlib_text_bytes(
    max_bytes: Optional[int] = None, val_every: int = 10
) -> Tuple[bytes, bytes]:
  """(train, held-out) bytes of the standard library's `.py` sources.

  Every `val_every`-th file (in sorted path order) goes to the held-out part,
  so no file is split between the two. Each part stops at `max_bytes`
  (held-out: `max_bytes // val_every`).
  """
  train, val = bytearray(), bytearray()
  val_cap = None if max_bytes is None else max(1, max_bytes // val_every)
  def full(part, cap):
    return cap is not None and len(part) >= cap

  for i, path in enumerate(stdlib_source_files()):
    if full(train, max_bytes) and full(val, val_cap):
      break
    part, cap = (val, val_cap) if i % val_every == val_every - 1 else (
        train, max_bytes)
    if full(part, cap):
      continue
    try:
      part += path.read_bytes() + b"\n"
    except OSError:
      continue
  if max_bytes is not None:
    train, val = train[:max_bytes], val[:val_cap]
  return bytes(train), bytes(val)


def lm_byte_splits(
    text_file: Optional[os.PathLike | str] = None,
    max_bytes: Optional[int] = None,
    val_fraction: float = 0.1,
) -> Dict[str, np.ndarray]:
  """uint8 token arrays {"train", "val"} for the byte-level language model.

  Args:
    text_file: a text file to use instead of the standard library's sources;
      its last `val_fraction` is held out.
    max_bytes: cap on the training bytes (held-out: the same fraction).
    val_fraction: held-out share for `text_file` (the stdlib split holds out
      every tenth file instead).
  """
  if text_file is None:
    train, val = stdlib_text_bytes(
        max_bytes, val_every=max(2, round(1 / val_fraction)))
  else:
    data = pathlib.Path(text_file).read_bytes()
    cut = int(round(len(data) * (1.0 - val_fraction)))
    train, val = data[:cut], data[cut:]
    if max_bytes is not None:
      train = train[:max_bytes]
      val = val[: max(1, int(max_bytes * val_fraction))]
  out = {
      "train": np.frombuffer(train, np.uint8).copy(),
      "val": np.frombuffer(val, np.uint8).copy(),
  }
  for k, v in out.items():
    if v.size < 2:
      raise ValueError(f"LM {k} split is empty; give a longer text file.")
  return out
