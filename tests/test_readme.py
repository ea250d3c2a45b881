"""The Python examples in README.md run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# The examples that moved from the README to the usage guide run as well.
GUIDE = README.parent / "docs" / "guide" / "usage.md"
GUIDE_BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 3 and len(GUIDE_BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  namespace = {"__name__": f"readme_example_{index}"}
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"),
       namespace)


@pytest.mark.parametrize("index", range(len(GUIDE_BLOCKS)))
def test_usage_guide_example_runs(index):
  namespace = {"__name__": f"usage_example_{index}"}
  exec(compile(GUIDE_BLOCKS[index], f"docs/guide/usage.md[python block"
               f" {index}]", "exec"), namespace)


def test_ci_runs_the_readme_test_command():
  commands = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
  lines = [l for l in commands.group(1).splitlines() if l.strip()]
  assert len(lines) == 2
  ci = (README.parent / ".ci" / "run").read_text()
  assert lines[1] in ci


def test_readme_summary_table_is_the_tools_from_the_committed_results():
  from optax_soaa.benchmarks import report  # pylint: disable=g-import-not-at-top
  from optax_soaa.benchmarks import schema  # pylint: disable=g-import-not-at-top
  text = README.read_text()
  runs = {schema.run_name(p): schema.load(p) for p in sorted(
      README.parent.glob("results/bench/*/results.json"))}
  table = report.summary_table(runs)
  assert report.with_summary(text, table) == text
  benchmarks = (README.parent / "BENCHMARKS.md").read_text().splitlines()
  first = next(i for i, line in enumerate(benchmarks) if line.startswith("|"))
  assert first < 30 and "\n".join(benchmarks[first:]).startswith(table[:200])


def test_readme_is_a_newcomers_page():
  assert len(README.read_text().splitlines()) <= 220


def test_readme_links_point_at_files_of_the_checkout():
  targets = re.findall(r"\]\(([^)#:]+)\)", README.read_text())
  assert targets
  missing = [t for t in targets if not (README.parent / t).exists()]
  assert not missing, missing
