"""The Python examples in README.md run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  namespace = {"__name__": f"readme_example_{index}"}
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"),
       namespace)


def test_ci_runs_the_readme_test_command():
  commands = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
  lines = [l for l in commands.group(1).splitlines() if l.strip()]
  assert len(lines) == 2
  ci = (README.parent / ".ci" / "run").read_text()
  assert lines[1] in ci
