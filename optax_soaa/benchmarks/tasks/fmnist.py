"""The `fmnist-cnn` task: the arTuRO paper's CNN protocol on Fashion-MNIST."""

from typing import Optional, Sequence

import numpy as np

from optax_soaa.benchmarks import data as data_lib
from optax_soaa.benchmarks import models
from optax_soaa.benchmarks.tasks.base import ADAM_FMNIST
from optax_soaa.benchmarks.tasks.base import ADAMW_FMNIST
from optax_soaa.benchmarks.tasks.base import ARTURO_FMNIST
from optax_soaa.benchmarks.tasks.base import ARTURO_REPO
from optax_soaa.benchmarks.tasks.base import common_hp
from optax_soaa.benchmarks.tasks.base import epoch_eval_every
from optax_soaa.benchmarks.tasks.base import milestones_at_fractions
from optax_soaa.benchmarks.tasks.base import QUICK_FACTORS
from optax_soaa.benchmarks.tasks.base import round_up
from optax_soaa.benchmarks.tasks.base import SGD_FMNIST
from optax_soaa.benchmarks.tasks.base import Task
from optax_soaa.benchmarks.tasks.base import train_length


def fmnist_cnn(quick: bool = False, steps: Optional[int] = None,
               factors: Optional[Sequence[float]] = None,
               data_dir: Optional[str] = None,
               epochs: Optional[float] = None, **_) -> Task:
  split = data_lib.load_fashion_mnist(data_dir)
  batch = 255
  rng = np.random.default_rng(1234)
  if quick:
    # Scaled-down protocol that fits minutes on a 2-core CPU (about 5
    # GFLOP per training step at batch 255): 8 batches per epoch (2,040
    # training images), 2 epochs, milestones at the same fractions (1/2,
    # 3/4) of training.
    train_idx = rng.permutation(split.x_train.shape[0])[: 8 * batch]
    default_epochs, eval_train, eval_test = 2, 250, 500
  else:
    train_idx = np.arange(split.x_train.shape[0])
    default_epochs, eval_train, eval_test = 120, 10_000, split.x_test.shape[0]
  x_train, y_train = split.x_train[train_idx], split.y_train[train_idx]
  steps_per_epoch = x_train.shape[0] // batch
  num_steps = train_length(steps, epochs, steps_per_epoch,
                      default_epochs * steps_per_epoch)
  # Evaluated once per epoch, as the authors' script does (at least four
  # times in a shorter run).
  if epochs is not None:
    eval_every = epoch_eval_every(num_steps, steps_per_epoch)
  else:
    eval_every = min(steps_per_epoch, max(1, num_steps // 4))
  num_steps = round_up(num_steps, eval_every)
  milestones = milestones_at_fractions(num_steps)
  train_eval_idx = rng.permutation(x_train.shape[0])[:eval_train]
  test_idx = rng.permutation(split.x_test.shape[0])[:eval_test]
  return Task(
      name="fmnist-cnn", kind="classify", model=models.FashionCNN(),
      example_input=split.x_train[:1],
      train_x=x_train, train_y=y_train,
      eval_sets={"train": (x_train[train_eval_idx], y_train[train_eval_idx]),
                 "test": (split.x_test[test_idx], split.y_test[test_idx])},
      batch_size=batch, num_steps=num_steps, eval_every=eval_every,
      centers={"adam": ADAM_FMNIST["lr"], "sgd": SGD_FMNIST["lr"],
               "kl": ARTURO_FMNIST["kl_bound"]},
      factors=tuple(factors or QUICK_FACTORS),
      hp=common_hp(
          {"b1": ADAM_FMNIST["b1"], "b2": ADAM_FMNIST["b2"]},
          {k: v for k, v in ADAMW_FMNIST.items() if k != "lr"},
          {k: v for k, v in SGD_FMNIST.items() if k != "lr"}),
      milestones=milestones, select_by="test_accuracy",
      steps_per_epoch=steps_per_epoch,
      tuned={
          "adam": (ADAM_FMNIST["lr"], f"{ARTURO_REPO}/adam/fmnist_cnn.yml"),
          "adamw": (ADAMW_FMNIST["lr"],
                    f"{ARTURO_REPO}/adamw/fmnist_cnn.yml"),
          "sgd": (SGD_FMNIST["lr"], f"{ARTURO_REPO}/sgd/fmnist_cnn.yml"),
          "arturo": (ARTURO_FMNIST["kl_bound"],
                     f"{ARTURO_REPO}/arturo/fmnist_cnn.yml"),
      },
      notes=(
          "arTuRO paper protocol (ALRhub/arturo): CNN 3x(3x3 conv 32/64/128,"
          " ReLU, VALID), max-pool after the first two, dropout 0.2 after each"
          " conv block, Dense 256 + dropout 0.5, Dense 10; pixels / 255;"
          " batch 255 (last partial batch of an epoch dropped); step schedule"
          " at 1/2 and 3/4 of training (the paper: epochs 60 and 90 of 120):"
          " x0.1 for every learning rate, x0.006 for arTuRO's kl_bound.",
          "Tuned hyperparameters of the authors' repository for Adam, AdamW,"
          " SGD-momentum and arTuRO; the others use their defaults with"
          " Adam's tuned learning rate as the sweep centre.",
          ("--quick (a smoke-scale run, not the paper's protocol): 2,040"
           " training images (8 batches/epoch), 2 epochs, evaluation on 250"
           " train and 500 test images."
           if quick else f"Full training set ({x_train.shape[0]:,} images,"
           f" {steps_per_epoch} batches/epoch); train metrics on a fixed"
           f" {eval_train:,}-image subset of it; test metrics on all"
           f" {split.x_test.shape[0]:,} test images."),
      ),
  )
