"""The core imports no Flax, orbax or benchmark code; the Flax glue has no
import-time side effects. Checked in a fresh interpreter."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import sys
import optax_soaa
heavy = sorted({m.split('.')[0] for m in sys.modules}
               & {'flax', 'orbax', 'matplotlib', 'sklearn', 'tqdm'})
bench = sorted(m for m in sys.modules if m.startswith('optax_soaa.benchmarks'))
assert not heavy, heavy
assert not bench, bench
from flax import nnx
before = (nnx.Linear.__call__, nnx.Conv.__call__)
import optax_soaa.flax
assert (nnx.Linear.__call__, nnx.Conv.__call__) == before
assert 'orbax' not in {m.split('.')[0] for m in sys.modules}
print('ok')
"""


def test_import_is_light_and_side_effect_free():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get(
      "PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().endswith("ok")
