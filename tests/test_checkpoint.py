"""Orbax checkpoints: a run restored in a fresh process continues bit-identically."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest

from tests import _reliability as R
from optax_soaa import checkpoint

SAVE_AT = 3
STOP = 7
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """Runs every optimizer uninterrupted and up to SAVE_AT (then saves), and
  resumes all of them in ONE fresh Python process (one start-up cost). That
  process also checks that importing optax_soaa (core, Flax helpers,
  checkpoint module) imports no orbax."""
  root = str(tmp_path_factory.mktemp("ckpt"))
  reference = {}
  for name in R.NAMES:
    tx = R.SPECS[name].make()
    params = R.init_params()
    state = tx.init(params)
    full = R.run(name, params, state, 0, STOP)
    reference[name] = full
    p, s, _ = R.run(name, params, state, 0, SAVE_AT)
    checkpoint.save(os.path.join(root, name), p, s, step=SAVE_AT)
  repo = os.path.dirname(HERE)
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, "_checkpoint_resume.py"), root,
       str(STOP), *R.NAMES],
      cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return root, reference


@pytest.mark.parametrize("name", R.NAMES)
def test_resume_in_fresh_process_is_bit_identical(resumed, name):
  root, reference = resumed
  params, state, losses = reference[name]
  leaves, treedef = jax.tree.flatten((params, state))
  with np.load(os.path.join(root, name + ".npz")) as got:
    assert str(got["treedef"]) == str(treedef)
    np.testing.assert_array_equal(got["losses"], np.asarray(losses)[SAVE_AT:])
    for i, leaf in enumerate(leaves):
      restored = got[f"leaf{i}"]
      assert restored.dtype == np.asarray(leaf).dtype
      np.testing.assert_array_equal(restored, np.asarray(leaf))


@pytest.mark.parametrize("name", R.NAMES)
def test_restore_gives_exact_structure_and_dtypes(tmp_path, name):
  tx = R.SPECS[name].make()
  params = R.init_params()
  params, state, _ = R.run(name, params, tx.init(params), 0, 2)
  checkpoint.save(tmp_path / "c", params, state, step=2)
  params_like = jax.eval_shape(R.init_params)
  got_params, got_state, step = checkpoint.restore(
      tmp_path / "c", params_like, jax.eval_shape(tx.init, params_like)
  )
  assert step == 2
  chex.assert_trees_all_equal_structs(got_state, state)
  chex.assert_trees_all_equal_dtypes(got_state, state)
  chex.assert_trees_all_equal((got_params, got_state), (params, state))





def test_restore_without_target_loses_the_state_types(tmp_path):
  """Why `restore` needs a target: orbax alone gives back dicts, not states."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tx = R.SPECS["soaa"].make()
  params = R.init_params()
  state = tx.init(params)
  checkpoint.save(tmp_path / "c", params, state)
  with ocp.StandardCheckpointer() as ckptr:
    raw = ckptr.restore(os.path.abspath(tmp_path / "c"))
  assert jax.tree.structure(raw["opt_state"]) != jax.tree.structure(state)
  _, restored, step = checkpoint.restore(tmp_path / "c", params, state)
  assert step is None
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert restored[0].curvature is None


def test_restore_into_another_optimizer_fails(tmp_path):
  """A checkpoint of curvature="variance" does not silently load into a
  "second_moment" optimizer (different state)."""
  params = R.init_params()
  tx_var = R.SPECS["soaa_variance"].make()
  checkpoint.save(tmp_path / "c", params, tx_var.init(params))
  tx_sm = R.SPECS["soaa"].make()
  with pytest.raises(ValueError):
    checkpoint.restore(tmp_path / "c", params, tx_sm.init(params))


def test_save_does_not_overwrite_unless_forced(tmp_path):
  params = R.init_params()
  tx = R.SPECS["soaa"].make()
  state = tx.init(params)
  checkpoint.save(tmp_path / "c", params, state, step=1)
  with pytest.raises(ValueError):
    checkpoint.save(tmp_path / "c", params, state, step=2)
  checkpoint.save(tmp_path / "c", params, state, step=2, force=True)
  assert checkpoint.restore(tmp_path / "c", params, state)[2] == 2
