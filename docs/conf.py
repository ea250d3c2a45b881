"""Sphinx configuration of the optax_soaa documentation site.

Build: ``python -m sphinx -W -n -b html docs docs/_build/html`` (warnings are
errors, nitpicky cross-references). The build needs no network, and neither
does the site it makes: MathJax is bundled with the site (from the
``sphinx-mathjax-offline`` package) and the other projects' Sphinx inventories
are read from ``docs/_inventories/`` (see ``docs/_inventories/README.md``).
The notebooks are rendered from the executed copies in ``docs/notebooks/``
(made by ``python docs/execute_notebooks.py``); the build never executes them.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import optax_soaa  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "optax_soaa"
author = "optax_soaa developers"
copyright = "2026, optax_soaa developers"  # pylint: disable=redefined-builtin
release = optax_soaa.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    # After sphinx.ext.mathjax: copies MathJax 3 into the site's _static/ and
    # points mathjax_path at that copy, so equations render offline.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinxarg.ext",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store",
                    "**.ipynb_checkpoints",
                    "README.md"]

# Notebooks: render the committed, executed copies; never execute them here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

templates_path = ["_templates"]
autosummary_generate = True
autodoc_typehints = "description"
# Types go next to the arguments a docstring documents, not into an extra
# list (a NamedTuple's fields are documented as attributes, with their shapes
# and dtypes in words).
autodoc_typehints_description_target = "documented"
napoleon_attr_annotations = False
python_use_unqualified_type_names = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False

# Links to the other projects' documentation, resolved offline against the
# inventories shipped in docs/_inventories/ (docs/_inventories/README.md says
# how they were made and how to refresh them).
_INVENTORIES = os.path.join(os.path.dirname(__file__), "_inventories")
intersphinx_mapping = {
    name: (url, os.path.join(_INVENTORIES, f"{name}.inv"))
    for name, url in {
        "optax": "https://optax.readthedocs.io/en/latest/",
        "jax": "https://docs.jax.dev/en/latest/",
        "flax": "https://flax.readthedocs.io/en/latest/",
        "equinox": "https://docs.kidger.site/equinox/",
    }.items()
}
# Names those inventories do not hold (type aliases such as optax.Updates,
# other projects' private modules) are listed as known, so that nitpicky mode
# (-n) still catches every broken reference to our own API.
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jnp|optax|flax|nnx|chex|numpy|np|orbax|ocp|argparse|os|"
              r"collections|typing|equinox|eqx|kfac_jax)(\..*)?"),
    ("py:.*", r"(Any|Optional|Union|Callable|Sequence|Mapping|NamedTuple|"
              r"PyTree|ArrayTree|Array|ScalarOrSchedule|Params|Updates|OptState|"
              r"GradientTransformation|GradientTransformationExtraArgs|"
              r"Schedule|PathLike|dtype|str|int|float|bool|tuple|list|dict|"
              r"None|callable|function|optional|default|Ellipsis)"),
    ("py:.*", r"(.*\.)?_[A-Za-z].*"),  # Private names in signatures.
]
# sphinx-argparse's domain cannot resolve MyST's generic links; the links
# themselves are still checked by MyST.
suppress_warnings = ["myst.domains"]

# Copy buttons: a copied example drops its ">>> " / "... " prompts and its
# outputs, so it pastes into Python as it is.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True

# "Open in Colab" links on the notebook pages, to the notebook (without
# outputs) in notebooks/ of this GitHub repository ("owner/name") at
# `colab_branch`. Empty: the pages have no such link. One setting; also
# `-D colab_repository=owner/name` on the sphinx command line.
colab_repository = ""
colab_branch = "main"
COLAB_URL = ("https://colab.research.google.com/github/{repository}/blob/"
             "{branch}/notebooks/{name}.ipynb")

html_theme = "furo"
html_title = f"optax_soaa {release}"
html_static_path = []
html_show_sourcelink = False


def _add_colab_link(app, doctree):
  """Puts an "Open in Colab" link at the top of each notebook's page."""
  from docutils import nodes  # pylint: disable=g-import-not-at-top
  docname = app.env.docname
  repository = app.config.colab_repository
  if not repository or not docname.startswith("notebooks/"):
    return
  url = COLAB_URL.format(repository=repository, branch=app.config.colab_branch,
                         name=docname.split("/", 1)[1])
  link = nodes.reference("", "Open in Colab", refuri=url,
                         classes=["colab-link"])
  para = nodes.paragraph("", "", link, classes=["colab-link"])
  section = next(iter(doctree.findall(nodes.section)), None)
  if section is None:
    doctree.insert(0, para)
  else:  # Below the notebook's title.
    title = next(iter(section.findall(nodes.title)), None)
    section.insert(section.index(title) + 1 if title else 0, para)


def setup(app):
  app.add_config_value("colab_repository", "", "html", types=[str])
  app.add_config_value("colab_branch", "main", "html", types=[str])
  app.connect("doctree-read", _add_colab_link)
