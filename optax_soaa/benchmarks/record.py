"""The environment record of a run: machine, device, versions, commit, command.

One place for it: the training benchmark (`schema.Environment`) and the
micro-benchmarks (`micro`) take theirs from `environment`. Paths in the
recorded command are relative to the checkout, so that a results file
committed to the repository names no directory of the machine that made it.
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from optax_soaa.benchmarks import schema

# The checkout this package runs from (when it runs from one).
ROOT = pathlib.Path(__file__).resolve().parents[2]


def cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> str:
  return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}"
          f" {platform.machine()}")


def load_average() -> Optional[list]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (OSError, AttributeError):
    return None


def git_commit() -> Optional[str]:
  """The checkout's short commit, "+modified" when the package differs."""
  try:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short",
                          "HEAD"], capture_output=True, text=True, timeout=5)
    commit = out.stdout.strip()
    if not commit:
      return None
    # Results written into the checkout (results/bench/) do not count.
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain",
         "--untracked-files=no", "--", "optax_soaa"],
        capture_output=True, text=True, timeout=5)
    return commit + ("+modified" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return None


def kfac_jax_version() -> Optional[str]:
  """kfac-jax's version, with the commit when installed from git; else None.

  Read from its distribution metadata, without importing it: the released
  0.0.8 and the GitHub main the benchmark can run (see kfac_baseline) carry
  the same version number.
  """
  try:
    dist = importlib.metadata.distribution("kfac-jax")
  except importlib.metadata.PackageNotFoundError:
    return None
  try:
    url = json.loads(dist.read_text("direct_url.json") or "null") or {}
  except ValueError:
    url = {}
  commit = (url.get("vcs_info") or {}).get("commit_id")
  return f"{dist.version} (git {commit[:12]})" if commit else dist.version


def portable_path(arg: str, root: pathlib.Path = ROOT) -> str:
  """An absolute path `arg` relative to the checkout; anything else as is.

  A path outside the checkout names its folder only (``<elsewhere>/name``,
  see `schema.elide_path`): the machine's directories are nobody's business.
  """
  if not os.path.isabs(arg):
    return arg
  path, root = pathlib.Path(arg).resolve(), pathlib.Path(root).resolve()
  if path == root or root in path.parents:
    return path.relative_to(root).as_posix() or "."
  return schema.elide_path(path.as_posix())


def portable_command(argv: Sequence[str],
                     root: pathlib.Path = ROOT) -> str:
  """The command line as recorded: absolute paths relative to the checkout.

  An argument ``--flag=/abs/path`` is handled like ``--flag /abs/path``.
  """
  out = []
  for arg in argv:
    flag, eq, value = arg.partition("=")
    if eq and flag.startswith("-"):
      out.append(f"{flag}={portable_path(value, root)}")
    else:
      out.append(portable_path(arg, root))
  return " ".join(shlex.quote(a) for a in out)


def environment(argv: Optional[Sequence[str]] = None) -> schema.Environment:
  """Machine, device and versions, recorded with every run."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  backend = jax.default_backend()
  device = ("CPU" if backend == "cpu" else
            f"{backend.upper()}: {devices[0].device_kind} x{len(devices)}")
  kfac = kfac_jax_version()
  conv_stats = None
  if kfac:
    from optax_soaa.benchmarks import kfac_baseline  # pylint: disable=g-import-not-at-top
    conv_stats = kfac_baseline.conv_input_stats()
  return schema.Environment(
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      command=portable_command(list(sys.argv if argv is None else argv)),
      machine=machine(), device=device, python=platform.python_version(),
      jax=jax.__version__, optax=optax.__version__, flax=flax.__version__,
      git_commit=git_commit(), load_average=load_average(), kfac_jax=kfac,
      kfac_conv_input_stats=conv_stats)
