"""Optimizer-state memory per precision mode, measured from the state pytree.

    python -m tests.state_memory           # print the markdown table
    python -m tests.state_memory --write   # refresh it in docs/reliability.md

Bytes are summed over the leaves of ``jax.eval_shape(tx.init, params)`` (no
memory is allocated) for a reference parameter tree of two dense layers.
tests/test_mixed_precision.py checks that docs/reliability.md holds exactly
this table, so the numbers there are never written by hand.
"""

from __future__ import annotations

import inspect
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import _reliability as R  # pylint: disable=g-import-not-at-top

import optax_soaa  # pylint: disable=g-import-not-at-top

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "docs", "reliability.md")
START = "<!-- state-memory-table:start -->"
END = "<!-- state-memory-table:end -->"

SHAPES = {"hidden": {"kernel": (1024, 1024), "bias": (1024,)},
          "out": {"kernel": (1024, 10), "bias": (10,)}}


def reference_params(dtype):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def accepts(factory, arg: str) -> bool:
  return arg in inspect.signature(factory).parameters


def state_dtype_kwargs(name: str, dtype) -> dict | None:
  """Options that put every params-shaped state array in `dtype`, or None
  when the optimizer has none (arTuRO keeps its filter in float32 or wider;
  an optimizer without a second-moment dtype option cannot do it fully)."""
  factory = {"soaa": optax_soaa.soaa}.get(name.split("_")[0])
  if name.startswith("adafisher"):
    factory = optax_soaa.adafisher
  if factory is None:
    return None
  kwargs = {"mu_dtype": dtype}
  has_nu = R.SPECS[name].make(mu_dtype=dtype).init(
      {"w": jnp.zeros(2)})
  needs_nu = optax.tree.get(has_nu, "nu") is not None
  if needs_nu:
    if not accepts(factory, "nu_dtype"):
      return None
    kwargs["nu_dtype"] = dtype
  return kwargs


def _takes_mu_dtype(name: str) -> bool:
  return name.startswith(("soaa", "adafisher"))


def modes(name: str):
  """(label, params dtype, optimizer kwargs) for the precision modes."""
  out = [("f32 params", jnp.float32, {}),
         ("bf16 params", jnp.bfloat16, {})]
  short = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}
  for params_dtype, state_dtype in ((jnp.bfloat16, jnp.float32),
                                    (jnp.float32, jnp.bfloat16)):
    p, s = short[jnp.dtype(params_dtype)], short[jnp.dtype(state_dtype)]
    kwargs = state_dtype_kwargs(name, state_dtype)
    if kwargs is not None:
      out.append((f"{p} params, {s} state", params_dtype, kwargs))
    elif accepts(R.SPECS[name].make, "mu_dtype") or _takes_mu_dtype(name):
      out.append((f"{p} params, {s} mu", params_dtype, {"mu_dtype": state_dtype}))
  return out


def measure(name: str, params_dtype, kwargs) -> tuple[int, int, str]:
  params = reference_params(params_dtype)
  state = jax.eval_shape(R.SPECS[name].make(**kwargs).init, params)
  n = sum(x.size for x in jax.tree.leaves(params))
  scalars = sorted({str(optax.tree.get(state, f).dtype)
                    for f in R.SPECS[name].trust_fields})
  return R.state_bytes(state), n, ",".join(scalars) or "-"


def table() -> str:
  n_params = sum(x.size for x in jax.tree.leaves(reference_params(jnp.float32)))
  lines = [
      f"State of the reference params ({n_params:,} parameters: dense "
      "1024x1024 and 1024x10 with biases). Adam (optax, f32) for scale.",
      "",
      "| optimizer | mode | state bytes | bytes / param | trust-region scalars |",
      "|---|---|---:|---:|---|",
  ]
  adam = jax.eval_shape(optax.adam(1e-3).init, reference_params(jnp.float32))
  adam_bytes = R.state_bytes(adam)
  lines.append(f"| adam | f32 params | {adam_bytes:,} | "
               f"{adam_bytes / n_params:.2f} | - |")
  for name in R.NAMES:
    for label, params_dtype, kwargs in modes(name):
      nbytes, n, scalars = measure(name, params_dtype, kwargs)
      lines.append(f"| {name} | {label} | {nbytes:,} | {nbytes / n:.2f} | "
                   f"{scalars} |")
  return "\n".join(lines)


def write_doc() -> None:
  with open(DOC) as f:
    text = f.read()
  head, rest = text.split(START)
  _, tail = rest.split(END)
  with open(DOC, "w") as f:
    f.write(head + START + "\n" + table() + "\n" + END + tail)


def doc_table() -> str:
  with open(DOC) as f:
    text = f.read()
  return text.split(START)[1].split(END)[0].strip()


if __name__ == "__main__":
  if "--write" in sys.argv[1:]:
    write_doc()
  print(table())
