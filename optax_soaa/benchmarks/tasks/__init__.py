"""Benchmark tasks: data, model, loss, evaluation sets, fixed settings.

Each task is a module with a builder returning a `Task` (`base`): `digits`,
`fmnist`, `lm`. `BUILDERS` maps a task's name to its builder; a new task is
a module and an entry there.
"""

from typing import Callable, Dict

from optax_soaa.benchmarks import data as data_lib
from optax_soaa.benchmarks.tasks.base import ADAFISHER_LM_STATS_EVERY
from optax_soaa.benchmarks.tasks.base import ADAM_FMNIST
from optax_soaa.benchmarks.tasks.base import ADAMW_FMNIST
from optax_soaa.benchmarks.tasks.base import ARTURO_FMNIST
from optax_soaa.benchmarks.tasks.base import BatchSampler
from optax_soaa.benchmarks.tasks.base import DEFAULT_FACTORS
from optax_soaa.benchmarks.tasks.base import milestones_at_fractions
from optax_soaa.benchmarks.tasks.base import QUICK_FACTORS
from optax_soaa.benchmarks.tasks.base import SGD_FMNIST
from optax_soaa.benchmarks.tasks.base import Task
from optax_soaa.benchmarks.tasks.digits import digits_mlp
from optax_soaa.benchmarks.tasks.fmnist import fmnist_cnn
from optax_soaa.benchmarks.tasks.lm import lm

BUILDERS: Dict[str, Callable[..., Task]] = {
    "digits-mlp": digits_mlp, "fmnist-cnn": fmnist_cnn, "lm": lm}
TASKS = tuple(BUILDERS)


def make_task(name: str, **kwargs) -> Task:
  if name not in BUILDERS:
    raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
  return BUILDERS[name](**kwargs)


__all__ = ("ADAFISHER_LM_STATS_EVERY", "ADAM_FMNIST", "ADAMW_FMNIST",
           "ARTURO_FMNIST", "BUILDERS", "BatchSampler", "DEFAULT_FACTORS",
           "QUICK_FACTORS", "SGD_FMNIST", "TASKS", "Task", "data_lib",
           "digits_mlp", "fmnist_cnn", "lm", "make_task",
           "milestones_at_fractions")
