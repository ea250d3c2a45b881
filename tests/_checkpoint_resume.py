"""Fresh-process half of tests/test_checkpoint.py.

Usage: python tests/_checkpoint_resume.py CKPT_ROOT STOP NAME [NAME ...]

For each optimizer NAME, rebuilds the optimizer and the model from scratch,
restores CKPT_ROOT/NAME with optax_soaa.checkpoint.restore (into abstract
targets: nothing of the first process survives), runs the steps from the saved
step to STOP, and writes the final params and state as CKPT_ROOT/NAME.npz
(leaves in tree order, plus the tree structure as text).
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import _reliability as R  # pylint: disable=g-import-not-at-top

from optax_soaa import checkpoint  # pylint: disable=g-import-not-at-top


def main(root, stop, names):
  # The optimizers, their Flax helpers and optax_soaa.checkpoint itself must
  # not import orbax until a checkpoint is read or written.
  early = sorted(m for m in sys.modules if m.startswith("orbax"))
  if early:
    raise SystemExit(f"orbax imported at import time: {early}")
  for name in names:
    tx = R.SPECS[name].make()
    params_like = jax.eval_shape(R.init_params)
    state_like = jax.eval_shape(tx.init, params_like)
    params, opt_state, step = checkpoint.restore(
        os.path.join(root, name), params_like, state_like
    )
    params, opt_state, losses = R.run(name, params, opt_state, step, stop)
    leaves, treedef = jax.tree.flatten((params, opt_state))
    np.savez(
        os.path.join(root, name + ".npz"),
        treedef=np.asarray(str(treedef)),
        losses=np.asarray(losses),
        **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)},
    )


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
