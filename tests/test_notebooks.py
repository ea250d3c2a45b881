"""The notebooks in notebooks/ run top to bottom and their jupytext pairs agree.

Each notebook is executed headless with nbclient in a fresh python3 kernel,
with tiny step counts (``OPTAX_SOAA_NOTEBOOK_STEPS``) and the repository root
on the kernel's ``PYTHONPATH`` so that it imports this checkout's
``optax_soaa`` (its guarded install cell then installs nothing). The kernel
runs in a temporary directory, so nothing is written into the checkout.
"""

import os
import pathlib
import re

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
STEPS_VAR = "OPTAX_SOAA_NOTEBOOK_STEPS"
TEST_STEPS = "12"
# 05_benchmarks runs the benchmark tool itself when it finds no results (it
# finds none in the temporary directory): keep that run small.
TEST_BENCH_ARGS = "--optimizers soaa-variance arturo --timing-pairs 1"
CELL_TIMEOUT_S = 300


def _read(name, ext):
  return jupytext.read(NOTEBOOK_DIR / f"{name}.{ext}")


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_the_five_notebooks_exist():
  assert [n[:2] for n in NAMES] == ["01", "02", "03", "04", "05"]
  for name in NAMES:
    assert (NOTEBOOK_DIR / f"{name}.ipynb").is_file(), name


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync(name):
  py, ipynb = _read(name, "py"), _read(name, "ipynb")
  assert [(c.cell_type, c.source) for c in py.cells] == [
      (c.cell_type, c.source) for c in ipynb.cells]
  assert ipynb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_committed_without_outputs(name):
  for cell in _code_cells(_read(name, "ipynb")):
    assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_is_the_guarded_install(name):
  source = _code_cells(_read(name, "ipynb"))[0].source
  assert 'importlib.util.find_spec("optax_soaa") is None' in source
  # One %pip line, inside the guard (indented), a real magic in the .ipynb
  # that Colab runs; no URL to edit first.
  pips = re.findall(r"^( *)%pip install .*$", source, re.M)
  assert len(pips) == 1 and pips[0]
  assert "http" not in source and "YOUR" not in source
  assert len(source.splitlines()) <= 12


@pytest.mark.parametrize("name", NAMES)
def test_one_step_count_variable_from_the_environment(name):
  sources = "\n".join(c.source for c in _code_cells(_read(name, "py")))
  assert sources.count(f'os.environ.get("{STEPS_VAR}"') == 1


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
  nb = _read(name, "ipynb")
  env = dict(os.environ)
  env[STEPS_VAR] = TEST_STEPS
  env["OPTAX_SOAA_BENCH_ARGS"] = TEST_BENCH_ARGS
  env.pop("OPTAX_SOAA_BENCH_RESULTS", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  env.setdefault("JAX_PLATFORMS", "cpu")  # CI is a CPU machine; skip probing
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
      allow_errors=False, record_timing=False)
  # Raises CellExecutionError, naming the cell and the traceback, on error.
  client.execute(cwd=str(tmp_path), env=env)
  outputs = [o for c in _code_cells(nb) for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, "every notebook draws at least one plot"


def test_install_cells_are_identical():
  cells = {_code_cells(_read(n, "ipynb"))[0].source for n in NAMES}
  assert len(cells) == 1


_FAKE_PIP = '''
import importlib.util
_real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name == "optax_soaa" else _real_find_spec(name, *a, **k))
from IPython.core.magic import register_line_magic

@register_line_magic
def pip(line):
  print("PIP:", line)
'''


def test_install_cell_picks_the_checkout_then_the_package_by_name(tmp_path):
  """The install branch, with optax_soaa hidden and %pip replaced by a fake:
  inside a checkout it installs that checkout, elsewhere `optax-soaa`."""
  install = _code_cells(_read(NAMES[0], "ipynb"))[0].source
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell(src) for src in (
      _FAKE_PIP,
      f"import os; os.chdir({str(NOTEBOOK_DIR)!r})", install,
      f"os.chdir({str(tmp_path)!r})", install)]
  nbclient.NotebookClient(nb, kernel_name="python3", timeout=60).execute(
      cwd=str(tmp_path), env=dict(os.environ))

  def printed(cell):
    return "".join(o.get("text", "") for o in cell.outputs)

  assert f'PIP: install -q -e "{ROOT}[examples]"' in printed(nb.cells[2])
  assert printed(nb.cells[4]) == "PIP: install -q optax-soaa[examples]\n"
