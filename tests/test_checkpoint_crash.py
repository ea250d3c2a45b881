"""A process killed (SIGKILL) in the middle of `checkpoint.save` loses nothing.

The child (tests/_checkpoint_crash.py) saves a large state; this process
kills it as soon as the save has written part of its data, then checks that
the previous checkpoint restores bit-identically and that the half-written
one is reported as incomplete instead of being read.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import pytest

import optax_soaa
from optax_soaa import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_PARAMS = 8 * 1024 * 1024  # Large enough that a save takes ~1 s here.
KILL_AFTER_BYTES = 1 << 20


def _optimizer():
  return optax_soaa.soaa(1e-3, total_steps=10)


def trained(steps):
  """Params and SOAA state after `steps` deterministic steps (any process)."""
  params = {"w": jnp.linspace(-1.0, 1.0, NUM_PARAMS, dtype=jnp.float32)
                 .reshape(-1, 1024)}
  tx = _optimizer()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(3.0 * p + t), params)
    updates, state = update(grads, state, params, value=jnp.float32(1.0 / (t + 1)))
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params, state


def _bytes_under(pattern):
  total = 0
  for top in glob.glob(pattern):
    for root, _, files in os.walk(top):
      for f in files:
        try:
          total += os.path.getsize(os.path.join(root, f))
        except FileNotFoundError:
          pass
  return total


def _kill_mid_save(directory, mode, partial_pattern):
  """Runs the child and kills it once the save wrote KILL_AFTER_BYTES."""
  child = subprocess.Popen(
      [sys.executable, os.path.join(HERE, "_checkpoint_crash.py"), directory,
       mode],
      stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
  lines = []
  try:
    for line in child.stdout:  # Blocks until the child starts saving step 2.
      lines.append(line.strip())
      if line.startswith("saving 2"):
        break
    deadline = time.monotonic() + 60
    while _bytes_under(partial_pattern) < KILL_AFTER_BYTES:
      assert child.poll() is None, f"child ended before the kill: {lines}"
      assert time.monotonic() < deadline, "the save never started writing"
      time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    lines += [l.strip() for l in child.stdout]
  finally:
    if child.poll() is None:
      child.kill()
  # The kill landed in the middle of the save, or the test proves nothing.
  assert "saved 2" not in lines, lines
  assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_replacement_keeps_the_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "ckpt")
  _kill_mid_save(directory, "replace",
                 directory + ".replacing*orbax-checkpoint-tmp*")
  params_like, state_like = jax.eval_shape(lambda: trained(0))
  params, state, step = checkpoint.restore(directory, params_like, state_like)
  assert step == 1
  want_params, want_state = trained(1)
  chex.assert_trees_all_equal((params, state), (want_params, want_state))
  # The next save over the same path clears what the killed one left.
  checkpoint.save(directory, params, state, step=3, force=True)
  assert checkpoint.restore(directory, params_like, state_like)[2] == 3
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.slow
def test_killed_new_checkpoint_is_detected_not_read(tmp_path):
  directory = str(tmp_path / "ckpt")
  _kill_mid_save(directory, "new", directory + "*orbax-checkpoint-tmp*")
  params_like, state_like = jax.eval_shape(lambda: trained(0))
  with pytest.raises(checkpoint.IncompleteCheckpointError, match="interrupted"):
    checkpoint.restore(directory, params_like, state_like)
  with pytest.raises(FileNotFoundError):
    checkpoint.restore(str(tmp_path / "never_saved"), params_like, state_like)


def test_interrupted_swap_reads_the_complete_new_checkpoint(tmp_path):
  """Killed between the two renames of a replacement: the new checkpoint
  (complete before the swap starts) is what restore reads, with a warning."""
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  tx = _optimizer()
  state = tx.init(params)
  directory = str(tmp_path / "ckpt")
  checkpoint.save(directory, params, state, step=1)
  checkpoint.save(directory + ".replacing", params, state, step=2)
  os.rename(directory, directory + ".replaced")
  with pytest.warns(RuntimeWarning, match="interrupted"):
    _, _, step = checkpoint.restore(directory, params, state)
  assert step == 2
