"""What every benchmark task is: the `Task` record, its batches, shared settings."""

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


# Tuned Fashion-MNIST CNN hyperparameters of the arTuRO authors' repository
# (ALRhub/arturo, experiments/hyperparameter_configs/<optimizer>/fmnist_cnn.yml).
ARTURO_FMNIST = dict(
    kl_bound=0.08567456308209788,
    reg_weight=0.05865661620286048,
    prior_prec=0.0015,
    dynamic_model_noise=0.017392958232048346,
    measurement_noise=2.8167911612651997,
    start_filter_cov=0.00005,
    var_init=0.01,
    eta_tol=0.5,
    nu=1.3,
    weight_decay=0.0000015403963328610538,
)
ADAM_FMNIST = dict(lr=0.0010124381281468571, b1=0.9452561249176903,
                   b2=0.9903417453021011)
ADAMW_FMNIST = dict(lr=0.0010042022959335032, b1=0.9222472693342788,
                    b2=0.9999446218805058, weight_decay=0.00014236954411167154)
SGD_FMNIST = dict(lr=0.07104941466307176, momentum=0.8657299202128064,
                  weight_decay=0.0002247076258274683)
# Step-schedule factors of the same configs (multi_step_lr_gamma).
GAMMA_BASELINE, GAMMA_ARTURO = 0.1, 0.006
ARTURO_REPO = "ALRhub/arturo experiments/hyperparameter_configs"
# Step-schedule milestones of the arTuRO protocol, as fractions of training
# (epochs 60 and 90 of 120).
MILESTONE_FRACTIONS = (1 / 2, 3 / 4)
# AdaFisher's statistics refresh period (the authors' TCov): the library
# default (100, their image-classification setting) for the classification
# tasks; their language-model script's default for `lm`
# (Language_Model/run_exp.py, --curvature_update_interval 10).
ADAFISHER_LM_STATS_EVERY = 10


def _arturo_fixed():
  return {k: v for k, v in ARTURO_FMNIST.items() if k != "kl_bound"}


@dataclasses.dataclass
class Task:
  """Everything the trainer needs to know about one benchmark task."""

  name: str
  kind: str  # "classify" or "lm"
  model: nn.Module
  example_input: np.ndarray
  train_x: np.ndarray  # classify: inputs; lm: the uint8 training stream.
  train_y: Optional[np.ndarray]
  # Fixed evaluation sets (inputs, targets), numpy.
  eval_sets: Dict[str, Tuple[np.ndarray, np.ndarray]]
  batch_size: int
  num_steps: int
  eval_every: int
  # Swept value = center[spec.scale] x factor, the same factors for all.
  centers: Dict[str, float]
  factors: Tuple[float, ...]
  # Fixed hyperparameters per optimizer name (keyword arguments).
  hp: Dict[str, Dict[str, Any]]
  milestones: Tuple[int, ...] = ()  # steps where the step schedule drops.
  gammas: Dict[str, float] = dataclasses.field(
      default_factory=lambda: {"kl": GAMMA_ARTURO, "default": GAMMA_BASELINE})
  select_by: str = "test_loss"  # final metric that picks the best sweep value
  # Optimizer name -> (swept value, where it comes from): the configurations
  # the tuned mode runs without a sweep.
  tuned: Dict[str, Tuple[float, str]] = dataclasses.field(default_factory=dict)
  seq_len: int = 0  # lm only
  steps_per_epoch: int = 0
  notes: Tuple[str, ...] = ()
  eval_chunk: int = 512

  # -- model and loss -------------------------------------------------------

  def init_params(self, key):
    return self.model.init(key, jnp.asarray(self.example_input))["params"]

  def _logits(self, params, x, train, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, x, train=train, rngs=rngs)

  def train_logits(self, params, batch, rng):
    """(logits, integer targets) of one training batch (dropout on)."""
    x, y = batch
    return self._logits(params, x, True, rng), y

  def loss_fn(self, params, batch, rng):
    """Mean training cross-entropy of one batch (dropout on)."""
    logits, y = self.train_logits(params, batch, rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def example_metrics(self, params, x, y):
    """Per-example (summed loss, correct count), evaluation mode."""
    logits = self._logits(params, x, False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    if self.kind == "lm":
      return losses.sum(-1), correct.sum(-1)
    return losses, correct

  @property
  def tokens_per_example(self) -> int:
    return self.seq_len if self.kind == "lm" else 1

  # -- batches --------------------------------------------------------------

  def device_data(self):
    """Training data as device arrays, passed to the jitted train chunk."""
    if self.kind == "lm":
      return (jnp.asarray(self.train_x.astype(np.int32)),)
    return (jnp.asarray(self.train_x), jnp.asarray(self.train_y))

  def get_batch(self, data, idx):
    """Gathers one batch inside jit from int32 indices `idx` of shape (B,)."""
    if self.kind == "lm":
      (tokens,) = data
      pos = idx[:, None] + jnp.arange(self.seq_len)[None, :]
      return tokens[pos], tokens[pos + 1]
    x, y = data
    return x[idx], y[idx]

  def sampler(self, seed: int) -> "BatchSampler":
    if self.kind == "lm":
      return BatchSampler(self.train_x.size - self.seq_len - 1,
                          self.batch_size, seed, random_offsets=True)
    return BatchSampler(self.train_x.shape[0], self.batch_size, seed)

  def schedule_multiplier(self, scale: str) -> Callable[[Any], Any]:
    """Step -> factor of the swept value (piecewise constant at milestones)."""
    gamma = self.gammas.get(scale, self.gammas["default"])
    milestones = jnp.asarray(self.milestones or (), jnp.int32)

    def multiplier(step):
      if not self.milestones:
        return jnp.ones([], jnp.float32)
      drops = jnp.sum(step >= milestones)
      return jnp.asarray(gamma, jnp.float32) ** drops

    return multiplier

  def describe(self) -> Dict[str, Any]:
    return dict(
        name=self.name, kind=self.kind, model=repr(self.model),
        batch_size=self.batch_size, num_steps=self.num_steps,
        eval_every=self.eval_every, centers=self.centers,
        factors=list(self.factors), hp=self.hp, milestones=list(self.milestones),
        gammas=self.gammas, select_by=self.select_by, seq_len=self.seq_len,
        steps_per_epoch=self.steps_per_epoch,
        epochs=(self.num_steps / self.steps_per_epoch
                if self.steps_per_epoch else None),
        tuned={k: dict(value=v, source=src)
               for k, (v, src) in self.tuned.items()},
        train_size=int(self.train_x.shape[0]),
        eval_sizes={k: int(v[0].shape[0]) for k, v in self.eval_sets.items()},
        notes=list(self.notes),
    )


class BatchSampler:
  """Host-side batch indices: epochs of shuffled examples (drop-last), or
  random window offsets for the LM. The same seed gives every optimizer the
  same batches."""

  def __init__(self, n: int, batch_size: int, seed: int,
               random_offsets: bool = False):
    if n < batch_size and not random_offsets:
      raise ValueError(f"batch size {batch_size} exceeds the {n} examples")
    self._n, self._b = n, batch_size
    self._rng = np.random.default_rng(seed)
    self._random = random_offsets
    self._perm = np.zeros(0, np.int64)

  def take(self, num_steps: int) -> np.ndarray:
    if self._random:
      return self._rng.integers(0, self._n, (num_steps, self._b)).astype(
          np.int32)
    out = []
    for _ in range(num_steps):
      if self._perm.size < self._b:
        self._perm = self._rng.permutation(self._n)
      out.append(self._perm[: self._b])
      self._perm = self._perm[self._b :]
    return np.stack(out).astype(np.int32)


def round_up(n: int, k: int) -> int:
  return max(k, int(math.ceil(n / k)) * k)


DEFAULT_FACTORS = (0.1, 10**-0.5, 1.0, 10**0.5, 10.0)
QUICK_FACTORS = (0.1, 10**-0.5, 1.0, 10**0.5)


def common_hp(adam: Mapping[str, Any], adamw: Mapping[str, Any],
               sgd: Mapping[str, Any],
               adafisher: Mapping[str, Any] = ()) -> Dict[str, Dict[str, Any]]:
  return {
      "adam": dict(adam),
      "adamw": dict(adamw),
      "sgd": dict(sgd),
      "soaa": {},
      "sophia": {},
      "adafisher": dict(adafisher),
      # AdaFisherW pairs with AdamW: the same decoupled weight decay.
      "adafisherw": {**dict(adafisher),
                     "weight_decay": adamw.get("weight_decay", 1e-4)},
      "arturo": _arturo_fixed(),
      "kfac": {},
  }


def train_length(steps: Optional[int], epochs: Optional[float],
            steps_per_epoch: int, default: int) -> int:
  """Training steps from --steps or --epochs (not both), else `default`."""
  if steps is not None and epochs is not None:
    raise ValueError("give either steps or epochs, not both")
  if steps is not None:
    if steps <= 0:
      raise ValueError(f"steps must be a positive int, got {steps}")
    return int(steps)
  if epochs is not None:
    if epochs <= 0:
      raise ValueError(f"epochs must be positive, got {epochs}")
    return max(1, int(round(epochs * steps_per_epoch)))
  return default


def epoch_eval_every(num_steps: int, steps_per_epoch: int) -> int:
  """Evaluation interval of an --epochs run: once per epoch, or, in a run of
  fewer than four epochs, the largest divisor of its length giving at least
  four evaluations (the run keeps its exact length)."""
  if num_steps >= 4 * steps_per_epoch and num_steps % steps_per_epoch == 0:
    return steps_per_epoch
  return max(d for d in range(1, max(1, num_steps // 4) + 1)
             if num_steps % d == 0)


def milestones_at_fractions(num_steps: int) -> Tuple[int, ...]:
  """The arTuRO protocol's step-schedule milestones, scaled to `num_steps`."""
  return tuple(int(round(num_steps * f)) for f in MILESTONE_FRACTIONS)
