"""Fused CPU kernels for the optimizers' passes over memory (XLA FFI).

On a single CPU device XLA cannot fuse a pass that both updates state arrays
and sums over them: it re-reads the arrays in separate kernels, or runs the
slice loops optax_soaa otherwise uses on one core. The kernels in
``cpu_kernels.cc`` do each such pass (arTuRO's filter and KL sums,
SOAA's moments and predicted-reduction sum) in one multi-threaded read, the
states updated in place. The optimizers use them where their chunking option
is ``"auto"``, the step is traced for a single CPU device, and the leaves
involved are all float32 or all float64; everything else runs on XLA.

The kernels are compiled at first use with the system's C++ compiler (``CXX``,
else ``g++``, ``c++`` or ``clang++``) against the FFI headers that ship with
jaxlib, for the machine they run on (``-march=native``), and cached in
``$OPTAX_SOAA_CACHE_DIR`` (default ``~/.cache/optax_soaa``), keyed by the
source, the compiler, jax's version and the CPU. Without a compiler, or when
the build fails, a warning says why and the XLA path is used. Set
``OPTAX_SOAA_NATIVE=0`` to always use the XLA path.

Each kernel has a ``jax.numpy`` restatement below (``_*_reference``): JAX
differentiates a kernel as its restatement (``jax.custom_jvp``), and the
tests compare the two. The kernels are not serialisable (``jax.export``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).parent / "cpu_kernels.cc"
_FLAGS = (
    "-O3", "-march=native", "-std=c++17", "-fPIC", "-shared",
    "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno",
)
_KERNELS = {
    # target stem: C++ symbol stem
    "arturo_filter": "OptaxSoaaArturoFilter",
    "arturo_kl": "OptaxSoaaArturoKl",
    "soaa_moments": "OptaxSoaaSoaaMoments",
    "soaa_predicted_reduction": "OptaxSoaaSoaaPredictedReduction",
}
_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def _compiler() -> Optional[list]:
  """The compiler command (a list: `CXX` may carry arguments, `ccache g++`)."""
  for command in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    words = shlex.split(command or "")
    if words and shutil.which(words[0]):
      return [shutil.which(words[0]), *words[1:]]
  return None


def _cpu_signature() -> str:
  """The CPU the build targets (-march=native): model and feature flags."""
  parts = [platform.machine()]
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("model name", "flags", "Features")):
          parts.append(line.strip())
        if len(parts) >= 3:
          break
  except OSError:
    parts.append(platform.processor())
  return "\n".join(parts)


def cache_dir() -> pathlib.Path:
  default = pathlib.Path(
      os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")
  ) / "optax_soaa"
  return pathlib.Path(os.environ.get("OPTAX_SOAA_CACHE_DIR", default))


def _headers() -> str:
  """The FFI headers the kernels compile against (jaxlib's)."""
  api = pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api"
  return "".join(p.read_text(encoding="utf-8")
                 for p in sorted(api.glob("*.h")))


def _build(compiler: list) -> pathlib.Path:
  """The compiled library's path, compiling it if the cache lacks it."""
  version = subprocess.run(
      [*compiler, "--version"], capture_output=True, text=True, check=True
  ).stdout
  key = hashlib.sha256(
      "\0".join([
          _SOURCE.read_text(encoding="utf-8"), " ".join(_FLAGS), version,
          _headers(), _cpu_signature(),
      ]).encode()
  ).hexdigest()[:20]
  directory = cache_dir()
  library = directory / f"cpu_kernels-{key}.so"
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent processes (pytest
  # -n, several workers) each build their own and one rename wins.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  try:
    result = subprocess.run(
        [*compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE),
         "-o", tmp],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
      raise RuntimeError(
          f"{shlex.join(compiler)} failed (exit {result.returncode}):\n"
          + result.stderr[-2000:]
      )
    # mkstemp made it private; a shared cache directory serves every user.
    os.chmod(tmp, 0o755)
    os.replace(tmp, library)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return library


@functools.cache
def available() -> bool:
  """Whether the fused CPU kernels are built, loaded and registered.

  Builds them on the first call (a few seconds; cached across processes).
  False when disabled by ``OPTAX_SOAA_NATIVE=0``, or, with a warning, when
  no C++ compiler is found or the build fails.
  """
  if os.environ.get("OPTAX_SOAA_NATIVE", "1").strip().lower() in (
      "0", "false", "no", "off"):
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn(
        "optax_soaa: no C++ compiler found (set CXX, or install g++), so the "
        "fused CPU kernels are not built; using the XLA path, which is "
        "slower on the CPU. Set OPTAX_SOAA_NATIVE=0 to silence this.",
        RuntimeWarning,
    )
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    for stem, symbol in _KERNELS.items():
      for dtype_name in _DTYPES.values():
        jax.ffi.register_ffi_target(
            _target_name(stem, dtype_name),
            jax.ffi.pycapsule(getattr(library, symbol + dtype_name.upper())),
            platform="cpu",
        )
  except Exception as e:  # pylint: disable=broad-exception-caught
    warnings.warn(
        f"optax_soaa: building the fused CPU kernels failed ({e}); using "
        "the XLA path, which is slower on the CPU. Set OPTAX_SOAA_NATIVE=0 "
        "to silence this.",
        RuntimeWarning,
    )
    return False
  return True


def _target_name(stem: str, dtype_name: str) -> str:
  return f"optax_soaa_{stem}_{dtype_name}"


@functools.cache
def _accelerator_present() -> bool:
  """Whether a GPU or TPU backend exists (a step could be lowered for it)."""
  for platform_name in ("gpu", "tpu"):
    try:
      if jax.devices(platform_name):
        return True
    except RuntimeError:  # no such backend
      pass
  return False


def usable(*arrays: Any) -> bool:
  """Whether a step over `arrays` (traced now) can use the kernels.

  Checked at trace time: a single CPU device and no accelerator backend
  (the kernels exist for the CPU only), and every array float32 or every
  array float64.
  """
  if (jax.default_backend() != "cpu" or jax.device_count() != 1
      or _accelerator_present()):
    return False
  dtypes = {np.dtype(x.dtype) for x in arrays}
  if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
    return False
  return available()


def _call(stem: str, reference: Callable[..., Any],
          inputs: Sequence[jax.Array], num_states: int, num_sums: int,
          state_offset: int):
  """Calls kernel `stem` on `inputs`; states alias their outputs.

  The states are inputs[state_offset : state_offset + num_states]; returns
  their new values and the sums (a vector). `reference(*inputs)` is the
  kernel's arithmetic in jax.numpy: the kernel is differentiated as it.
  """
  if not available():
    raise RuntimeError("optax_soaa: the fused CPU kernels are not available.")
  # The kernels see every array as flat, in its row-major layout. No
  # reshape here: XLA copied a reshaped (bitcast) state whole to alias it.
  dtype = np.dtype(inputs[0].dtype)
  states = inputs[state_offset:state_offset + num_states]
  out_types = [jax.ShapeDtypeStruct(x.shape, dtype) for x in states]
  out_types.append(jax.ShapeDtypeStruct((num_sums,), dtype))
  kernel = jax.ffi.ffi_call(
      _target_name(stem, _DTYPES[dtype]), out_types,
      input_output_aliases={state_offset + k: k for k in range(num_states)},
      vmap_method="sequential",
  )

  @jax.custom_jvp
  def fused(*args):
    return tuple(kernel(*args))

  @fused.defjvp
  def fused_jvp(primals, tangents):
    _, tangents_out = jax.jvp(reference, primals, tangents)
    return tuple(kernel(*primals)), tuple(tangents_out)

  outs = fused(*inputs)
  return list(outs[:num_states]), outs[num_states]


def _scalars(values: Sequence[Any], dtype: Any) -> jax.Array:
  return jnp.stack([jnp.asarray(v).astype(dtype) for v in values])


# The kernels' arithmetic in jax.numpy, on the same inputs (scalars packed
# in one vector, flags as 0/1). They define the kernels' derivatives, and
# the tests compare the kernels with them.


def _arturo_kl_reference(p, b, h, lam, scalars, etas):
  reg_prior, decay, clip, use_decay = (scalars[i] for i in range(4))
  theta = jnp.where(use_decay != 0, p - p * decay, p).reshape(-1)
  h, b, lam = h.reshape(-1), b.reshape(-1), lam.reshape(-1)
  curvature = jnp.where(clip != 0, jnp.maximum(h, 0), h) + reg_prior
  temp = lam * etas[:, None]
  mu = (temp * theta - b) / (curvature + temp)
  return jnp.sum(jnp.square(theta - mu) * lam, axis=1)


def _arturo_filter_reference(g, p, lam, b, h, p00, p01, p11, scalars, etas):
  first, q, meas, reg_prior, nu, rho = (scalars[i] for i in range(6))
  decay, clip, use_decay = scalars[6], scalars[7], scalars[8]
  theta = jnp.where(use_decay != 0, p - p * decay, p)
  curvature = jnp.where(clip != 0, jnp.maximum(h, 0), h) + reg_prior
  first = first != 0
  lam = jnp.where(first, lam, (curvature + lam * nu) / (rho + nu))
  b = jnp.where(first, g, b)
  p00, p11 = p00 + q, p11 + q
  k0 = p00 + p01 * theta
  k1 = p01 + p11 * theta
  s = k0 + k1 * theta + meas
  gain0, gain1 = k0 * (1 / s), k1 * (1 / s)
  innovation = (g - theta * h - b) / s
  b, h = b + k0 * innovation, h + k1 * innovation
  p00, p01, p11 = (p00 - gain0 * (s * gain0), p01 - gain0 * (s * gain1),
                   p11 - gain1 * (s * gain1))
  sums = _arturo_kl_reference(p, b, h, lam, scalars[jnp.array([3, 6, 7, 8])],
                              etas)
  return lam, b, h, p00, p01, p11, sums


def _soaa_moments_reference(g, m, s, v, scalars, *, variance):
  c1, b1, c2, b2, bc1, first = (scalars[i] for i in range(6))
  m = c1 * g + b1 * m
  s = c2 * (g * g) + b2 * s
  if not variance:  # v is a placeholder; Σ v is Σ s
    return m, s, v, jnp.stack([jnp.sum(m * m), jnp.sum(s)])
  deviation = jnp.where(first != 0, 0, g - m / bc1)
  v = b2 * v + c2 * (deviation * deviation)
  return m, s, v, jnp.stack([jnp.sum(m * m), jnp.sum(v)])


def _soaa_predicted_reduction_reference(m, s, v, scalars):
  inv_bc1, inv_bc2, one_plus_r, dt, eps = (scalars[i] for i in range(5))
  m_hat, s_hat, v_hat = m * inv_bc1, s * inv_bc2, v * inv_bc2
  scale = jnp.maximum(dt * (one_plus_r * v_hat), jnp.sqrt(s_hat))
  u = m_hat * dt / (scale + eps)
  return (jnp.sum(u * (m_hat - 0.5 * v_hat * u))[None],)


def arturo_filter(g, p, states, scalars, etas):
  """arTuRO's filter pass over one leaf; see `ArturoFilterImpl`.

  states: (λ, b, h, P00, P01, P11); scalars: [first, q, R, ρ p0, ν, ρ,
  decay, clip, use_decay]. Returns the new states and the unhalved KL sums
  at `etas`.
  """
  dtype = g.dtype
  return _call(
      "arturo_filter", _arturo_filter_reference,
      [g, p, *states, _scalars(scalars, dtype), etas.astype(dtype)],
      num_states=6, num_sums=etas.shape[0], state_offset=2,
  )


def arturo_kl(p, b, h, lam, scalars, etas):
  """Unhalved KL sums at `etas` over one leaf; scalars: [ρ p0, decay, clip,
  use_decay]."""
  dtype = p.dtype
  return _call(
      "arturo_kl", lambda *xs: (_arturo_kl_reference(*xs),),
      [p, b, h, lam, _scalars(scalars, dtype), etas.astype(dtype)],
      num_states=0, num_sums=etas.shape[0], state_offset=0,
  )[1]


def soaa_moments(g, m, s, v, scalars):
  """SOAA's moment pass over one leaf: new (m, s, v) and [Σ m², Σ v].

  `v` is None for curvature="second_moment" (Σ v is then Σ s).
  scalars: [1 - b1, b1, 1 - b2, b2, bc1, first].
  """
  dtype = g.dtype
  variance = v is not None
  placeholder = jnp.zeros((1,), dtype)
  inputs = [g, m, s, v if variance else placeholder,
            _scalars([*scalars, variance], dtype)]
  reference = functools.partial(_soaa_moments_reference, variance=variance)
  (m, s, v), sums = _call("soaa_moments", reference, inputs, num_states=3,
                          num_sums=2, state_offset=1)
  return m, s, (v if variance else None), sums


def soaa_predicted_reduction(m, s, v, scalars):
  """Σ u (m̂ - ½ v̂ u) over one leaf; scalars: [1/bc1, 1/bc2, 1 + r, dt,
  eps]."""
  dtype = m.dtype
  return _call(
      "soaa_predicted_reduction", _soaa_predicted_reduction_reference,
      [m, s, v, _scalars(scalars, dtype)],
      num_states=0, num_sums=1, state_offset=0,
  )[1][0]
