"""The `digits-mlp` task: an MLP on scikit-learn's embedded digits."""

from typing import Optional, Sequence


from optax_soaa.benchmarks import data as data_lib
from optax_soaa.benchmarks import models
from optax_soaa.benchmarks.tasks.base import ARTURO_FMNIST
from optax_soaa.benchmarks.tasks.base import common_hp
from optax_soaa.benchmarks.tasks.base import DEFAULT_FACTORS
from optax_soaa.benchmarks.tasks.base import epoch_eval_every
from optax_soaa.benchmarks.tasks.base import QUICK_FACTORS
from optax_soaa.benchmarks.tasks.base import round_up
from optax_soaa.benchmarks.tasks.base import Task
from optax_soaa.benchmarks.tasks.base import train_length


def digits_mlp(quick: bool = False, steps: Optional[int] = None,
               factors: Optional[Sequence[float]] = None,
               epochs: Optional[float] = None, **_) -> Task:
  split = data_lib.load_digits_split()
  batch = 128
  steps_per_epoch = split.x_train.shape[0] // batch
  num_steps = train_length(steps, epochs, steps_per_epoch,
                           300 if quick else 1000)
  if epochs is not None:
    eval_every = epoch_eval_every(num_steps, steps_per_epoch)
  else:
    eval_every = 25 if num_steps >= 100 else max(1, num_steps // 4)
  num_steps = round_up(num_steps, eval_every)
  return Task(
      name="digits-mlp", kind="classify", model=models.MLP(),
      example_input=split.x_train[:1],
      train_x=split.x_train, train_y=split.y_train,
      eval_sets={"train": (split.x_train, split.y_train),
                 "test": (split.x_test, split.y_test)},
      batch_size=batch, num_steps=num_steps, eval_every=eval_every,
      centers={"adam": 1e-3, "sgd": 0.1, "kl": ARTURO_FMNIST["kl_bound"]},
      factors=tuple(factors or (QUICK_FACTORS if quick else DEFAULT_FACTORS)),
      hp=common_hp({}, {}, {"momentum": 0.9}),
      steps_per_epoch=steps_per_epoch,
      notes=("MLP 64-128-128-10 (ReLU) on sklearn load_digits, stratified"
             " 80/20 split (random_state=0), batch 128, constant step size;"
             " optimizer defaults except the swept value; arTuRO uses the"
             " Fashion-MNIST tuned configuration (the only tuned one).",),
  )
