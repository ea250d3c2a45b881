"""Child process of tests/test_checkpoint_crash.py: saves, then is killed.

Usage: python tests/_checkpoint_crash.py DIRECTORY MODE

Builds a large SOAA state (8M parameters, about 100 MB on disk) with the
same arithmetic as the test process, then:
* MODE "replace": saves step 1 to DIRECTORY, prints "saved 1", and saves
  step 2 over it with force=True;
* MODE "new": saves step 2 to DIRECTORY (which does not exist).
It prints "saving 2" before the second kind of save and "saved 2" after it;
the test kills it (SIGKILL) in between.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import test_checkpoint_crash as T  # pylint: disable=g-import-not-at-top

from optax_soaa import checkpoint  # pylint: disable=g-import-not-at-top


def main(directory, mode):
  if mode == "replace":
    params, state = T.trained(1)
    checkpoint.save(directory, params, state, step=1)
    print("saved 1", flush=True)
  params, state = T.trained(2)
  print("saving 2", flush=True)
  checkpoint.save(directory, params, state, step=2, force=(mode == "replace"))
  print("saved 2", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
