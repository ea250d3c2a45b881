"""The results of a benchmark run, typed: what the runner writes and the report reads.

A run (`Run`) is one invocation of ``python -m optax_soaa.bench`` for one task,
or several when it was resumed: the machine and command of each
(`Environment`), the task (`TaskInfo`), and per optimizer (`OptimizerResult`)
its settings, its step timing (`Timing`), the curves of every seed
(`SeedCurves`) and the summary `summarize` derives from them (best value,
final metrics, time to Adam's target).

``results.json`` is `Run.to_json()`; `load` reads every version the tool has
written, migrating older ones (`migrate`), so that the report and the notebooks
read one format. Version history:

* 1 (no ``schema_version`` key): the environment also as ``environment``, each
  optimizer's timing also flattened into it, commands with the paths as typed.
* 2: one copy of each; paths relative to the checkout, and a ``--tuned-from``
  source named by its run (the folder of its results.json).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import typing
from typing import Any, Dict, List, Optional

import numpy as np

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"

# Written only when set (older runs and optimizers without them lack them).
_OPTIONAL = dict(metadata={"omit_none": True}, default=None)


@dataclasses.dataclass
class Environment:
  """The machine, command and versions of one invocation."""

  date: str
  command: str  # as run, paths relative to the checkout
  machine: str
  device: str
  python: str
  jax: str
  optax: str
  flax: str
  git_commit: Optional[str] = None  # "+modified": the package differed
  # 1, 5 and 15 minute load averages when the run started (others' work on
  # the machine skews step times).
  load_average: Optional[List[float]] = dataclasses.field(**_OPTIONAL)
  kfac_jax: Optional[str] = dataclasses.field(**_OPTIONAL)
  kfac_conv_input_stats: Optional[str] = dataclasses.field(**_OPTIONAL)


@dataclasses.dataclass
class TaskInfo:
  """What a run trained: the task's data, model, length and fixed settings."""

  name: str
  kind: str  # "classify" or "lm"
  model: str
  batch_size: int
  num_steps: int
  eval_every: int
  centers: Dict[str, float]  # sweep centre per scale ("adam", "sgd", "kl")
  factors: List[float]
  hp: Dict[str, Dict[str, Any]]  # fixed hyperparameters per optimizer
  milestones: List[int]
  gammas: Dict[str, float]
  select_by: str
  seq_len: int
  steps_per_epoch: int
  epochs: Optional[float]
  tuned: Dict[str, Dict[str, Any]]  # name -> {value, source}
  train_size: int
  eval_sizes: Dict[str, int]
  notes: List[str]

  @property
  def length(self) -> str:
    return (f"{self.epochs:.3g} epochs" if self.epochs
            else f"{self.num_steps} steps")


@dataclasses.dataclass
class Timing:
  """An optimizer's train step timed against Adam's, before training."""

  step_time_ratio: float  # median over interleaved pairs
  step_time_s: float
  adam_step_time_s: float
  timing_pairs: int
  timing_inner_steps: int
  state_bytes: int
  compile_s: float
  timing_wall_s: float
  # Steps over which the step's cost repeats; absent in runs before samples
  # spanned whole periods.
  cost_period: Optional[int] = dataclasses.field(**_OPTIONAL)


@dataclasses.dataclass
class SeedCurves:
  """One seed's evaluations; every list of lists is (evaluations, values)."""

  seed: int
  step: List[int]
  train_loss: List[List[Optional[float]]]
  train_accuracy: List[List[Optional[float]]]
  test_loss: List[List[Optional[float]]]
  test_accuracy: List[List[Optional[float]]]
  batch_loss: List[Optional[List[Optional[float]]]]  # None before training
  diagnostic: List[Optional[List[Optional[float]]]]
  per_step: Dict[str, List[List[Optional[float]]]]  # (steps, values)
  measured_step_s: Optional[float]  # median training step
  first_interval_s: Optional[float]  # includes compilation
  wall_s: float
  # SOAA: share of each evaluation interval's steps with dt at a bound.
  dt_at_lower: Optional[List[List[float]]] = dataclasses.field(**_OPTIONAL)
  dt_at_upper: Optional[List[List[float]]] = dataclasses.field(**_OPTIONAL)


@dataclasses.dataclass
class OptimizerResult:
  """One optimizer on one task: settings, timing, curves and summary."""

  name: str
  description: str
  swept: str  # "learning_rate" or "kl_bound"
  scale: str
  extra_args: List[str]
  diagnostic: Optional[str]
  step_diagnostics: List[str]
  status: str = "ok"  # "ok", "unavailable" or "error"
  reason: Optional[str] = dataclasses.field(**_OPTIONAL)
  traceback: Optional[str] = dataclasses.field(**_OPTIONAL)
  values: List[float] = dataclasses.field(default_factory=list)
  factors: List[float] = dataclasses.field(default_factory=list)
  center: Optional[float] = None
  hp: Dict[str, Any] = dataclasses.field(default_factory=dict)
  execution: Optional[str] = None
  curves: List[SeedCurves] = dataclasses.field(default_factory=list)
  seeds: List[int] = dataclasses.field(default_factory=list)
  timing: Optional[Timing] = None
  wall_s: Optional[float] = None
  # Tuned mode: where the value comes from (a published configuration, or
  # "picked by the sweep <run>").
  value_source: Optional[str] = dataclasses.field(**_OPTIONAL)
  # Which invocation (index into Run.environments) trained it, and which
  # later ones added values to its sweep.
  environment_index: Optional[int] = dataclasses.field(**_OPTIONAL)
  extended_by: Optional[List[int]] = dataclasses.field(**_OPTIONAL)
  # The summary (summarize.summarize), from the curves.
  best_index: Optional[int] = dataclasses.field(**_OPTIONAL)
  best_value: Optional[float] = dataclasses.field(**_OPTIONAL)
  final: Optional[Dict[str, Optional[float]]] = dataclasses.field(**_OPTIONAL)
  final_per_value: Optional[Dict[str, List[Optional[float]]]] = (
      dataclasses.field(**_OPTIONAL))
  test_accuracy_seeds: Optional[List[float]] = dataclasses.field(**_OPTIONAL)
  test_accuracy_mean: Optional[float] = dataclasses.field(**_OPTIONAL)
  test_accuracy_std: Optional[float] = dataclasses.field(**_OPTIONAL)
  train_step_s: Optional[float] = dataclasses.field(**_OPTIONAL)
  dt_at_bounds: Optional[Dict[str, float]] = dataclasses.field(**_OPTIONAL)
  state_bytes_ratio: Optional[float] = dataclasses.field(**_OPTIONAL)
  target_test_loss: Optional[float] = dataclasses.field(**_OPTIONAL)
  steps_to_target: Optional[int] = dataclasses.field(**_OPTIONAL)
  seconds_to_target: Optional[float] = dataclasses.field(**_OPTIONAL)

  @property
  def ok(self) -> bool:
    return self.status == "ok" and bool(self.curves)

  @property
  def summarized(self) -> bool:
    return self.ok and self.final is not None

  @property
  def swept_label(self) -> str:
    return "kl_bound" if self.swept == "kl_bound" else "lr"

  @property
  def at_sweep_edge(self) -> bool:
    return len(self.values) > 1 and self.best_index in (0,
                                                         len(self.values) - 1)


@dataclasses.dataclass
class Run:
  """A results.json: one task, every optimizer, every invocation."""

  environments: List[Environment]
  task: TaskInfo
  mode: str  # "sweep" or "tuned"
  seeds: List[int]
  execution: str
  optimizers: Dict[str, OptimizerResult]
  complete: bool
  planned_optimizers: List[str]
  target_test_loss: Optional[float] = None
  wall_s: float = 0.0
  # How the run came about, in words, where the records above cannot say
  # it (a machine's load, a package installed from a local clone).
  provenance_notes: List[str] = dataclasses.field(
      default_factory=list, metadata={"omit_empty": True})
  schema_version: int = SCHEMA_VERSION

  @property
  def environment(self) -> Environment:
    """The first invocation's (a resumed run lists later ones after it)."""
    return self.environments[0]

  @property
  def tuned(self) -> bool:
    return self.mode == "tuned"

  def to_json(self) -> Dict[str, Any]:
    return to_json_value(self)

  @classmethod
  def from_json(cls, data: Dict[str, Any]) -> "Run":
    return _from_json(cls, migrate(data))


# -- JSON -----------------------------------------------------------------------


def clean(x):
  """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return clean(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def to_json_value(obj):
  if dataclasses.is_dataclass(obj):
    return {f.name: to_json_value(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (getattr(obj, f.name) is None
                    and f.metadata.get("omit_none"))
            and not (f.metadata.get("omit_empty") and not getattr(obj, f.name))}
  if isinstance(obj, dict):
    return {k: to_json_value(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json_value(v) for v in obj]
  return clean(obj)


def _from_json(kind, data):
  """`data` (JSON) as `kind`, a type hint of this module's dataclasses."""
  if data is None:
    return None
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin is typing.Union:  # Optional[X]
    return _from_json(next(a for a in args if a is not type(None)), data)
  if origin is list:
    return [_from_json(args[0], v) for v in data]
  if origin is dict:
    return {k: _from_json(args[1], v) for k, v in data.items()}
  if dataclasses.is_dataclass(kind):
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(data) - names
    if unknown:
      raise ValueError(f"{kind.__name__}: unknown fields {sorted(unknown)}")
    return kind(**{k: _from_json(hints[k], v) for k, v in data.items()})
  return data


def to_text(run: Run) -> str:
  return json.dumps(clean(run.to_json()), indent=1, allow_nan=False)


def save(path: os.PathLike, run: Run) -> None:
  pathlib.Path(path).write_text(to_text(run))


def load(path: os.PathLike) -> Run:
  """A results.json of any version, as a `Run`."""
  return Run.from_json(json.loads(pathlib.Path(path).read_text()))


def run_name(path: os.PathLike) -> str:
  """A run's name: the folder of its results.json (``results/bench/<run>``)."""
  path = pathlib.Path(path)
  return (path.parent if path.suffix == ".json" else path).resolve().name


# -- migrations -------------------------------------------------------------------

# An absolute path as a command or a note spelled it: a run before version 2
# recorded them verbatim.
_ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:[\w.+-]+/)+[\w.+-]*")
# What a version-1 note of a --tuned-from source looks like.
_SWEEP_SOURCE = re.compile(r"picked by the sweep (\S+?)/results\.json")


def elide_path(path: str) -> str:
  """An absolute path of another machine, without the machine's part.

  A checkout's ``results/bench/<run>/...`` keeps that relative part; any other
  folder (a scratch output directory) becomes ``<elsewhere>/<its name>``.
  """
  parts = pathlib.PurePosixPath(path).parts
  for i in range(len(parts) - 1):
    if parts[i] == "results" and parts[i + 1] == "bench":
      return "/".join(parts[i:])
  return f"<elsewhere>/{parts[-1]}"


def elide_paths(text: str) -> str:
  """`text` with every absolute path elided (see `elide_path`)."""
  text = _SWEEP_SOURCE.sub(
      lambda m: f"picked by the sweep {run_name(m.group(1) + '/x.json')}",
      text)
  return _ABSOLUTE.sub(lambda m: elide_path(m.group(0)), text)


def _migrate_1_to_2(data: Dict[str, Any]) -> Dict[str, Any]:
  data = dict(data)
  data["environments"] = [
      dict(e, command=elide_paths(e["command"]))
      for e in data.get("environments") or [data["environment"]]]
  data.pop("environment", None)
  optimizers = {}
  for name, r in data["optimizers"].items():
    r = dict(r)
    for key in (r.get("timing") or {}):
      r.pop(key, None)  # flattened copies of `timing`
    r.pop("seconds_per_step", None)  # = timing.step_time_s
    for f in dataclasses.fields(OptimizerResult):  # unset: absent, not null
      if f.metadata.get("omit_none") and r.get(f.name, 0) is None:
        del r[f.name]
    if r.get("value_source"):
      r["value_source"] = elide_paths(r["value_source"])
    optimizers[name] = r
  data["optimizers"] = optimizers
  data["schema_version"] = 2
  return data


_MIGRATIONS = {1: _migrate_1_to_2}


def migrate(data: Dict[str, Any]) -> Dict[str, Any]:
  """A results.json payload of any version, as the current version's JSON."""
  version = data.get("schema_version", 1)
  if version > SCHEMA_VERSION:
    raise ValueError(f"results schema version {version} is newer than this"
                     f" code's {SCHEMA_VERSION}; update optax_soaa")
  while version < SCHEMA_VERSION:
    data = _MIGRATIONS[version](data)
    version = data["schema_version"]
  return data
