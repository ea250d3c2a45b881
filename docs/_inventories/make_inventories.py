"""Writes the Sphinx inventories (``NAME.inv``) that ``docs/conf.py`` links to.

Usage::

  python docs/_inventories/make_inventories.py optax=PATH jax=PATH \\
      flax=PATH equinox=PATH

where each ``PATH`` is a checkout of that project's repository (its
documentation sources). The documentation build reads the ``.inv`` files
written here and never downloads the projects' own ``objects.inv``.

An inventory maps an object's name to the page of the project's published
site that documents it. This script reads where each name is documented from
the project's documentation sources, as their own builds place it:

* Sphinx sources (optax, jax, flax): ``.. autosummary::`` entries under
  ``:toctree: DIR`` get a page ``DIR/<full name>.html`` beside the listing
  page; ``.. autofunction::``, ``.. autoclass::`` (and the other ``auto``
  directives) and ``.. automodule::`` document the name on the listing page.
* mkdocstrings sources (equinox): ``::: full.name`` documents the name on the
  page ``<path of the .md without .md>/`` (mkdocs' directory URLs).

The object's kind (class, function, module, data) comes from importing it
from the installed package; a name that does not import is skipped. Public
methods and attributes of a documented class are listed at the class's page,
and a name re-exported by a parent module (``optax.inject_hyperparams`` for
``optax.schedules.inject_hyperparams``) at its original's.
The file is the format of Sphinx's ``objects.inv`` (version 2: a four-line
header, then zlib-compressed lines ``name domain:role priority uri dispname``).
"""

import importlib
import inspect
import pathlib
import re
import sys
import types
import zlib

HERE = pathlib.Path(__file__).resolve().parent

# Where each project's documentation lives in its repository, and whether it
# is built by Sphinx or by mkdocs/mkdocstrings. flax.readthedocs.io is built
# from docs_nnx/ (the Linen site moved to its own domain).
PROJECTS = {
    "optax": ("docs", "sphinx", "optax"),
    "jax": ("docs", "sphinx", "jax"),
    "flax": ("docs_nnx", "sphinx", "flax"),
    "equinox": ("docs", "mkdocs", "equinox"),
}

_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)(?:\.\. |```\{)(?P<name>[a-z:]+)(?:::|\})\s*(?P<arg>.*)$")
_AUTO = {"autofunction", "autoclass", "autoexception", "autodata",
         "automethod", "autoattribute", "autodecorator", "autoproperty"}


def _import(name):
  """The object called `name`, or None."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except Exception:  # pylint: disable=broad-except
      continue
    try:
      for attr in parts[i:]:
        obj = getattr(obj, attr)
    except Exception:  # pylint: disable=broad-except
      return None
    return obj
  return None


def _role(obj):
  if isinstance(obj, types.ModuleType):
    return "module"
  if inspect.isclass(obj):
    return "exception" if issubclass(obj, BaseException) else "class"
  if callable(obj):
    return "function"
  return "data"


def _sphinx_entries(doc_root):
  """(full name, page uri without anchor, explicit?) from Sphinx sources."""
  for path in sorted(doc_root.rglob("*")):
    if path.suffix not in (".rst", ".md") or "_build" in path.parts:
      continue
    page = path.relative_to(doc_root).with_suffix("")
    module = ""
    lines = path.read_text(errors="replace").splitlines()
    i = 0
    while i < len(lines):
      match = _DIRECTIVE.match(lines[i])
      i += 1
      if not match:
        continue
      name, arg = match["name"], match["arg"].strip()
      if name in ("currentmodule", "module", "py:module", "py:currentmodule"):
        module = arg
        if name in ("module", "py:module"):
          yield arg, f"{page}.html", "module"
      elif name == "automodule":
        module = arg
        yield arg, f"{page}.html", "module"
      elif name in _AUTO:
        full = arg.split("(")[0].strip()
        if module and not full.startswith(module + "."):
          full = f"{module}.{full}"
        yield full, f"{page}.html", None
      elif name == "autosummary":
        indent = len(match["indent"])
        toctree = None
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip())
                                  > indent):
          entry = lines[i].strip()
          i += 1
          if entry.startswith(":toctree:"):
            toctree = entry.split(":", 2)[2].strip().rstrip("/")
          elif entry and not entry.startswith((":", "..", "```")):
            entry = entry.lstrip("~").split()[0]
            full = f"{module}.{entry}" if module else entry
            if toctree:
              uri = (page.parent / toctree / f"{full}.html").as_posix()
            else:
              uri = f"{page}.html"
            yield full, uri, None


def _mkdocs_entries(doc_root):
  for path in sorted(doc_root.rglob("*.md")):
    page = path.relative_to(doc_root).with_suffix("").as_posix()
    page = "" if page == "index" else page.removesuffix("/index") + "/"
    for line in path.read_text(errors="replace").splitlines():
      if line.startswith("::: "):
        yield line[4:].strip(), page, None


def inventory(project, checkout):
  doc_dir, kind, package = PROJECTS[project]
  doc_root = pathlib.Path(checkout) / doc_dir
  entries = (_sphinx_entries if kind == "sphinx" else _mkdocs_entries)(doc_root)
  lines = {}
  for full, uri, role in entries:
    obj = _import(full)
    if obj is None:
      continue
    role = role or _role(obj)
    anchor = f"module-{full}" if role == "module" and kind == "sphinx" else full
    lines.setdefault(full, f"{full} py:{role} 1 {uri}#{anchor} -")
    # The same object re-exported by a parent module (optax's
    # `optax.schedules.inject_hyperparams` is `optax.inject_hyperparams`,
    # flax's `flax.nnx.optimizer.Optimizer` is `flax.nnx.Optimizer`): the
    # shorter names, which users write, link to the same place.
    parts = full.split(".")
    for i in range(1, len(parts) - 1):
      short = ".".join(parts[:i] + parts[-1:])
      if role != "module" and _import(short) is obj:
        lines.setdefault(short, f"{short} py:{role} 1 {uri}#{anchor} -")
    if role in ("class", "exception"):
      for attr, value in vars(obj).items():
        if attr.startswith("_"):
          continue
        member = "method" if callable(value) or isinstance(
            value, (classmethod, staticmethod)) else "attribute"
        if isinstance(value, property):
          member = "property"
        lines.setdefault(f"{full}.{attr}",
                         f"{full}.{attr} py:{member} 1 {uri}#{full}.{attr} -")
  version = getattr(importlib.import_module(package), "__version__", "")
  header = (f"# Sphinx inventory version 2\n# Project: {project}\n"
            f"# Version: {version}\n"
            "# The remainder of this file is compressed using zlib.\n")
  body = "".join(line + "\n" for line in sorted(lines.values()))
  (HERE / f"{project}.inv").write_bytes(
      header.encode() + zlib.compress(body.encode(), 9))
  return len(lines)


def main(args):
  for arg in args:
    project, checkout = arg.split("=", 1)
    print(f"{project}: {inventory(project, checkout)} names -> {project}.inv")


if __name__ == "__main__":
  main(sys.argv[1:])
