"""The documentation site builds without warnings and is complete.

Builds `docs/` with Sphinx once per session (`-E -W -n`: from scratch,
warnings are errors, every cross-reference checked), then checks that every
public symbol has an API page, that the CLI page documents every option, that
the notebooks are rendered from executed copies that match their sources,
that the site loads nothing from the network, and that its pages render in a
real browser: the index, and every algorithm page with its equations typeset
by the bundled MathJax, no raw TeX left (headless Chromium with the network
cut off; skipped, saying why, when Chromium is not installed: `.ci/run`
installs Debian's `chromium` when it can).
"""

import doctest
import html
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("site")
  doctrees = tmp_path_factory.mktemp("doctrees")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-E", "-W", "-n", "--keep-going", "-q",
       "-d", str(doctrees), "-b", "html", str(DOCS), str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  return out


def test_getting_started_code_runs():
  """The page's Python blocks, in order, in one namespace (as a reader would
  paste them), run without error and train."""
  blocks = re.findall(r"```python\n(.*?)```",
                      (DOCS / "getting_started.md").read_text(), re.S)
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block, "docs/getting_started.md", "exec"), namespace)  # pylint: disable=exec-used
  first = namespace["loss_fn"](
      {"w1": 0.5 * namespace["jax"].random.normal(namespace["k1"], (4, 16)),
       "b1": namespace["jnp"].zeros(16),
       "w2": 0.5 * namespace["jax"].random.normal(namespace["k2"], (16, 1))},
      namespace["x"], namespace["y"])
  assert float(namespace["loss"]) < 0.1 * float(first)


def test_colab_link_follows_the_setting_in_conf(site):
  """`colab_repository` in docs/conf.py drives the "Open in Colab" link of
  each notebook page; empty (as committed until the repository is public),
  the pages have none."""
  import types  # pylint: disable=g-import-not-at-top
  from docutils import nodes  # pylint: disable=g-import-not-at-top
  from docutils.frontend import get_default_settings  # pylint: disable=g-import-not-at-top
  from docutils.utils import new_document  # pylint: disable=g-import-not-at-top
  namespace = {"__file__": str(DOCS / "conf.py")}
  exec(compile((DOCS / "conf.py").read_text(), "conf.py", "exec"), namespace)  # pylint: disable=exec-used

  def page(docname, repository):
    doctree = new_document("test", get_default_settings())
    section = nodes.section("", nodes.title("", "A notebook"),
                            nodes.paragraph("", "Text."))
    doctree += section
    app = types.SimpleNamespace(
        env=types.SimpleNamespace(docname=docname),
        config=types.SimpleNamespace(colab_repository=repository,
                                     colab_branch=namespace["colab_branch"]))
    namespace["_add_colab_link"](app, doctree)
    return [r["refuri"] for r in doctree.findall(nodes.reference)], section

  links, section = page("notebooks/04_arturo", "someone/optax_soaa")
  assert links == ["https://colab.research.google.com/github/someone/"
                   "optax_soaa/blob/main/notebooks/04_arturo.ipynb"]
  assert isinstance(section[1], nodes.paragraph)  # Right below the title.
  assert page("notebooks/04_arturo", "")[0] == []
  assert page("algorithms/soaa", "someone/optax_soaa")[0] == []
  built = (site / "notebooks" / "04_arturo.html").read_text()
  assert ("colab.research.google.com" in built) == bool(
      namespace["colab_repository"])


def _page_doctests(page):
  """The page's ``pycon`` blocks as one doctest, and whether the page opens
  with one (its first code block, before the first section)."""
  text = (DOCS / "algorithms" / f"{page}.md").read_text()
  blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M))
  first_section = text.find("\n## ")
  opens = bool(blocks) and blocks[0][1] == "pycon" and (
      first_section < 0 or blocks[0].start() < first_section)
  source = "\n".join(b[2] for b in blocks if b[1] == "pycon")
  test = doctest.DocTestParser().get_doctest(
      source, {}, f"docs/algorithms/{page}.md", None, 0)
  return opens, test


@pytest.mark.parametrize("page", ["soaa", "arturo", "adafisher"])
def test_algorithm_page_opens_with_a_snippet_that_runs(page):
  """Each algorithm page opens with a runnable example (``pycon`` blocks:
  doctests, run here in one namespace as a reader would paste them)."""
  opens, test = _page_doctests(page)
  assert opens, f"{page}: the first code block is not a pycon example"
  assert len(test.examples) >= 5
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0 and result.attempted == len(test.examples)


def _public_names():
  import optax_soaa  # pylint: disable=g-import-not-at-top
  import optax_soaa.checkpoint  # pylint: disable=g-import-not-at-top
  import optax_soaa.flax  # pylint: disable=g-import-not-at-top
  names = [f"optax_soaa.{n}" for n in optax_soaa.__all__]
  names += [f"optax_soaa.flax.{n}" for n in optax_soaa.flax.__all__]
  names += [f"optax_soaa.checkpoint.{n}" for n in optax_soaa.checkpoint.__all__]
  return names


def test_every_public_symbol_has_an_api_page(site):
  missing = [n for n in _public_names()
             if not (site / "_autosummary" / f"{n}.html").is_file()]
  assert not missing, missing


def test_api_pages_document_every_field_and_show_clean_signatures(site):
  """Each field of a public NamedTuple or dataclass has its entry on the
  class's page (from the docstring's Attributes section), and no page shows
  an object's repr in a signature. The pending names of
  tests/test_api_docs.py are skipped here the same way."""
  from tests import test_api_docs  # pylint: disable=g-import-not-at-top
  missing = []
  for name in _public_names():
    page = (site / "_autosummary" / f"{name}.html").read_text()
    assert not re.search(r"&lt;[^&]* at 0x|&lt;object object", page), name
    obj = test_api_docs._resolve(name)  # pylint: disable=protected-access
    if name in test_api_docs.PENDING or not test_api_docs._is_record(obj):  # pylint: disable=protected-access
      continue
    missing += [f"{name}.{f}" for f in test_api_docs.own_fields(obj)
                if f'id="{name}.{f}"' not in page]
  assert not missing, missing


def test_other_projects_names_link_to_their_docs(site):
  """Intersphinx, from the inventories in docs/_inventories (no network)."""
  index = (site / "index.html").read_text()
  start = (site / "getting_started.html").read_text()
  api = (site / "_autosummary" / "optax_soaa.soaa.html").read_text()
  for page, url in [
      (index, "https://optax.readthedocs.io/en/latest/api/generated/"
              "optax.chain.html#optax.chain"),
      (index, "https://docs.jax.dev/en/latest/_autosummary/jax.jit.html"),
      (start, "https://flax.readthedocs.io/en/latest/api_reference/"
              "flax.training.html#flax.training.train_state.TrainState"),
      (start, "https://docs.kidger.site/equinox/api/module/module/"
              "#equinox.Module"),
      (api, "https://optax.readthedocs.io/en/latest/api/generated/"
            "optax.GradientTransformationExtraArgs.html")]:
    assert f'href="{url}' in page, url


def test_every_page_of_the_toctree_was_built(site):
  for page in ["index", "getting_started", "algorithms/soaa",
               "algorithms/arturo", "algorithms/adafisher", "distributed",
               "reliability", "benchmarks", "update_step", "api", "cli",
               "changelog",
               "internals", "search"]:
    assert (site / f"{page}.html").is_file(), page


def test_cli_page_documents_every_option(site):
  from optax_soaa import bench  # pylint: disable=g-import-not-at-top
  text = (site / "cli.html").read_text()
  options = [o for a in bench.build_parser()._actions  # pylint: disable=protected-access
             for o in a.option_strings if o not in ("-h", "--help")]
  assert len(options) > 5
  for option in options:
    assert option in text, option


def _sources(nb_path):
  cells = json.loads(nb_path.read_text())["cells"]
  return [(c["cell_type"], "".join(c["source"])) for c in cells]


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))
def test_notebook_rendered_from_its_executed_copy(site, name):
  executed = DOCS / "notebooks" / f"{name}.ipynb"
  assert executed.is_file(), f"run `python docs/execute_notebooks.py {name}`"
  # The executed copy has the notebook's cells, unchanged: it is not stale.
  assert _sources(executed) == _sources(ROOT / "notebooks" / f"{name}.ipynb")
  cells = json.loads(executed.read_text())["cells"]
  outputs = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert not [o for o in outputs if o["output_type"] == "error"]
  html = (site / "notebooks" / f"{name}.html").read_text()
  assert "<img" in html


def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


needs_chromium = pytest.mark.skipif(
    _chromium() is None,
    reason="no Chromium installed (Debian: apt-get install chromium; .ci/run "
           "installs it when it can); the browser checks need one")

# Every host name resolves to nothing: the pages render as they would for a
# reader without network, and anything they fetch from the web is missing.
_OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"
# Virtual time: scripts (MathJax's typesetting) run to completion before the
# DOM or the screenshot is taken, however slow the machine.
_SCRIPT_TIME = "--virtual-time-budget=20000"


def _browser(*args, timeout=120):
  return subprocess.run(
      [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
       "--hide-scrollbars", _OFFLINE, _SCRIPT_TIME, *args],
      check=True, capture_output=True, timeout=timeout)


def _assert_not_blank(shot, size=(900, 1280)):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  pixels = matplotlib.image.imread(shot)[..., :3]
  assert pixels.shape[:2] == size
  # Not blank: text and the sidebar give many distinct colours and dark ink.
  colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
  assert len(colours) > 50, len(colours)
  assert (pixels.mean(-1) < 0.4).mean() > 0.002


def _visible_text(dom):
  """The text a reader sees in an HTML document (no scripts, styles, tags)."""
  dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
  return html.unescape(re.sub(r"<[^>]+>", " ", dom))


# What TeX looks like when nothing typeset it: MathJax's delimiters (Sphinx
# writes \( \) and \[ \]), $$, environments and common commands.
_RAW_TEX = re.compile(
    r"\\[()\[\]]|\$\$|\\begin\{|\\end\{|\\(frac|sum|hat|left|right|"
    r"mathrm|text|qquad|leftarrow|sqrt|tfrac|max|clip)\b")


def raw_tex(text):
  """Each place of `text` where TeX is shown as source, with its context."""
  return [text[max(m.start() - 30, 0):m.end() + 30].strip()
          for m in _RAW_TEX.finditer(text)]


def test_raw_tex_finder():
  assert raw_tex(r"at step \(t\) the \[\hat m = \frac{m}{1-\beta}\]")
  assert raw_tex("$$ x $$") and raw_tex(r"\begin{aligned} x \end{aligned}")
  assert not raw_tex("plain text, a path C:\\data, 2 \\ 3, and m\u0302 = m / b")


def test_site_loads_nothing_from_the_network(site):
  """Scripts, styles and fonts come with the site (MathJax included)."""
  remote = re.compile(
      r"<(script|link|img)\b[^>]*\b(src|href)=[\"'](https?:)?//", re.I)
  pages = sorted(site.rglob("*.html"))
  assert len(pages) > 30
  offending = [str(p.relative_to(site)) for p in pages
               if remote.search(p.read_text())]
  assert not offending, offending
  assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()


@needs_chromium
def test_index_page_renders_in_a_browser(site, tmp_path):
  shot = tmp_path / "index.png"
  _browser(f"--screenshot={shot}", "--window-size=1280,900",
           (site / "index.html").as_uri())
  _assert_not_blank(shot)


ALGORITHM_PAGES = ("soaa", "arturo", "adafisher")


@needs_chromium
@pytest.mark.parametrize("page", ALGORITHM_PAGES)
def test_algorithm_page_shows_typeset_math_in_a_browser(site, tmp_path, page):
  """Offline, every equation of the page is typeset: no TeX source shows."""
  path = site / "algorithms" / f"{page}.html"
  source = path.read_text()
  # The page has equations, as Sphinx wrote them for MathJax.
  formulas = len(re.findall(r'class="math[ "]', source))
  assert formulas > 0
  assert raw_tex(_visible_text(source))
  shot = tmp_path / f"{page}.png"
  _browser(f"--screenshot={shot}", "--window-size=1280,900", path.as_uri())
  _assert_not_blank(shot)
  dom = _browser("--dump-dom", path.as_uri()).stdout.decode()
  leftover = raw_tex(_visible_text(dom))
  assert not leftover, (
      f"{page}: TeX shown as source in the browser ({len(leftover)} places, "
      f"of {formulas} formulas; is MathJax bundled?): {leftover[:5]}")
  # Each formula became MathJax's output.
  assert dom.count("<mjx-container") >= formulas, (
      dom.count("<mjx-container"), formulas)
