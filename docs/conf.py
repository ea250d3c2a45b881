"""Sphinx configuration of the optax_soaa documentation site.

Build: ``python -m sphinx -W -n -b html docs docs/_build/html`` (warnings are
errors, nitpicky cross-references). The notebooks are rendered from the
executed copies in ``docs/notebooks/`` (made by ``python
docs/execute_notebooks.py``); the build never executes them.
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
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints",
                    "README.md"]

# Notebooks: render the committed, executed copies; never execute them here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

templates_path = ["_templates"]
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False

# No network here: cross-references to other projects' docs are not checked
# against their inventories. Their names are listed as known instead, so that
# nitpicky mode (-n) still catches every broken reference to our own API.
intersphinx_mapping = {}
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

html_theme = "furo"
html_title = f"optax_soaa {release}"
html_static_path = []
html_show_sourcelink = False
