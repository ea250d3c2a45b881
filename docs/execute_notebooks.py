"""Executes the notebooks and writes the copies the documentation renders.

Usage: python docs/execute_notebooks.py [NAME ...]   (default: all five)

Each ``notebooks/NAME.ipynb`` (committed without outputs) runs top to bottom
in a fresh ``python3`` kernel with this checkout on its ``PYTHONPATH`` and
its default step counts, in a temporary directory; the executed notebook,
outputs and plots included, is written to ``docs/notebooks/NAME.ipynb``. The
Sphinx build renders those copies and never executes anything;
``tests/test_docs.py`` fails when a copy's cells differ from its notebook's
(re-run this script after editing a notebook).
"""

import os
import pathlib
import sys
import tempfile
import time

import jupytext
import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks"
TARGET = ROOT / "docs" / "notebooks"


def execute(name: str) -> pathlib.Path:
  nb = jupytext.read(SOURCE / f"{name}.ipynb")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  env.setdefault("JAX_PLATFORMS", "cpu")
  # The benchmark notebook plots the results published in the repository
  # (of its default task).
  env.setdefault("OPTAX_SOAA_BENCH_RESULTS",
                 str(ROOT / "results" / "bench" / "digits-mlp"))
  with tempfile.TemporaryDirectory() as cwd:
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=3600,
                            allow_errors=False).execute(cwd=cwd, env=env)
    _without_machine_paths(nb, {str(ROOT): ".", cwd: "."})
  TARGET.mkdir(parents=True, exist_ok=True)
  out = TARGET / f"{name}.ipynb"
  nbformat.write(nb, out)
  return out


def _without_machine_paths(nb, prefixes):
  """Outputs with the checkout's and the scratch folder's paths relative.

  A warning names the file that raised it, a notebook may print where it
  read from: the committed copy must not name this machine's directories.
  """
  def clean(text):
    for prefix, short in prefixes.items():
      text = text.replace(prefix + "/", "" if short == "." else short + "/")
      text = text.replace(prefix, short)
    return text

  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if "text" in output:
        output["text"] = clean(output["text"])
      for key, value in output.get("data", {}).items():
        if key.startswith("text/") and isinstance(value, str):
          output["data"][key] = clean(value)


def main(names):
  names = names or sorted(p.stem for p in SOURCE.glob("[0-9][0-9]_*.ipynb"))
  for name in names:
    start = time.time()
    out = execute(name)
    print(f"{name}: {time.time() - start:.0f} s -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
  main(sys.argv[1:])
