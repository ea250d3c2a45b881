"""The optimizers the benchmark compares, and what each train step must give them.

Each entry builds a factory ``f(hyperparameter) -> GradientTransformation`` of
the one swept hyperparameter (the learning rate, or arTuRO's KL bound), with
every other hyperparameter fixed per task. The factory goes through
``optax.inject_hyperparams`` so that the swept value lives in the optimizer
state and ``jax.vmap`` can train all sweep values in one compiled step.

An optimizer whose API is missing from the installed ``optax_soaa``, or an
optional baseline that is not installed (kfac-jax), is reported as
unavailable, not a crash. K-FAC is not an optax transformation: it runs
through its own API (``kfac_baseline``), with the same swept learning rate.
"""

import dataclasses
import inspect
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import optax

import optax_soaa
from optax_soaa.benchmarks import kfac_baseline

# SOAA's dt and the trust ratio that moved it: dt_t = clip(ratio_t dt_{t-1},
# lower_t, upper_t), so a step whose dt differs from ratio_t dt_{t-1} was
# clipped (see runner.clip_side).
SOAA_STEP_DIAGNOSTICS = ("dt", "trust_ratio")

# What a train step must pass to `update` besides grads, state and params.
VALUE = "value"  # the loss at the current params (SOAA's trust region).
STATS = "stats"  # per-layer statistics from optax_soaa.flax (AdaFisher).
OBJ_FN = "obj_fn"  # params -> loss on this batch (Sophia's Hutchinson probe).


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How to build and drive one optimizer in the benchmark."""

  name: str
  # "adam": swept around the task's Adam-scale learning rate; "sgd": around
  # the SGD learning rate; "kl": arTuRO's kl_bound.
  scale: str
  # (task hyperparameters, total steps) -> factory of the swept value.
  build: Callable[[Mapping[str, Any], int], Callable[[Any], Any]]
  extra_args: FrozenSet[str] = frozenset()
  # State field logged at every evaluation (read with optax.tree.get).
  diagnostic: Optional[str] = None
  description: str = ""
  # None when usable, else why not.
  available: Callable[[], Optional[str]] = lambda: None
  # Scalar state fields recorded after every step (optax.tree.get).
  step_diagnostics: Tuple[str, ...] = ()
  # "optax": a GradientTransformation from `build`; "kfac": kfac-jax's own
  # Optimizer (see kfac_baseline), `build` unused.
  kind: str = "optax"
  # (task hyperparameters) -> the number of steps over which the step's cost
  # repeats (Sophia's Hessian estimate every `update_interval` steps,
  # AdaFisher's statistics every `stats_every`, K-FAC's inverses every 5):
  # each timing sample spans a whole period, so the measured step time is
  # the mean cost of a training step, not that of the cheap steps.
  period: Callable[[Mapping[str, Any]], int] = lambda hp: 1
  # The key of its fixed hyperparameters in a task's `hp` (SOAA's two
  # curvatures share "soaa"); default: its name.
  hp_key: str = ""

  def __post_init__(self):
    if not self.hp_key:
      object.__setattr__(self, "hp_key", self.name)

  @property
  def swept(self) -> str:
    return "kl_bound" if self.scale == "kl" else "learning_rate"


def _needs(attr: str, module: Any = optax_soaa, label: str = "optax_soaa"):
  def check() -> Optional[str]:
    if not hasattr(module, attr):
      return f"{label}.{attr} is missing from this installation"
    return None

  return check


def _adafisher_available() -> Optional[str]:
  reason = _needs("adafisher")()
  if reason:
    return reason
  try:
    import optax_soaa.flax as oflax  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - Flax is a dependency.
    return f"optax_soaa.flax cannot be imported: {e}"
  return _needs("value_grad_and_stats", oflax, "optax_soaa.flax")()


def _soaa(curvature: str):
  def build(hp, total_steps):
    return lambda learning_rate: optax_soaa.soaa(
        learning_rate, total_steps=total_steps, curvature=curvature,
        **hp.get("soaa", {}))
  return build


def _adam(hp, total_steps):
  del total_steps
  return lambda learning_rate: optax.adam(learning_rate, **hp.get("adam", {}))


def _adamw(hp, total_steps):
  del total_steps
  return lambda learning_rate: optax.adamw(learning_rate, **hp.get("adamw", {}))


def _sgd(hp, total_steps):
  """SGD with heavy-ball momentum and coupled (L2) weight decay, as torch's."""
  del total_steps
  kw = dict(hp.get("sgd", {}))
  weight_decay = kw.pop("weight_decay", 0.0)

  def make(learning_rate):
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, **kw),
    )

  return make


def _default(fn, name):
  return inspect.signature(fn).parameters[name].default


def _period(name, fn, arg):
  """hp -> `arg` of optimizer `name` (its task value, else fn's default)."""
  return lambda hp: int(hp.get(name, {}).get(arg, _default(fn, arg)))


def _sophia(hp, total_steps):
  del total_steps
  return lambda learning_rate: optax.contrib.sophia(
      learning_rate, **hp.get("sophia", {}))


def _arturo(hp, total_steps):
  del total_steps
  return lambda kl_bound: optax_soaa.arturo(kl_bound, **hp.get("arturo", {}))


def _kfac(hp, total_steps):
  """Unused: kfac-jax owns its train step (see kfac_baseline)."""
  del hp, total_steps
  raise TypeError("kfac runs through kfac_baseline, not an optax factory")


def _adafisher(name: str):
  def build(hp, total_steps):
    del total_steps
    return lambda learning_rate: getattr(optax_soaa, name)(
        learning_rate, **hp.get(name, {}))
  return build


REGISTRY: Dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            "adam", "adam", _adam, description="optax.adam (reference)"),
        OptimizerSpec(
            "soaa", "adam", _soaa("second_moment"), frozenset({VALUE}), "dt",
            "optax_soaa.soaa (default curvature='second_moment'), "
            "value=loss", step_diagnostics=SOAA_STEP_DIAGNOSTICS),
        OptimizerSpec(
            "soaa-variance", "adam", _soaa("variance"), frozenset({VALUE}),
            "dt", "optax_soaa.soaa(curvature='variance'), value=loss",
            step_diagnostics=SOAA_STEP_DIAGNOSTICS, hp_key="soaa"),
        OptimizerSpec(
            "arturo", "kl", _arturo, diagnostic="eta",
            description="optax_soaa.arturo; swept: kl_bound",
            available=_needs("arturo"),
            step_diagnostics=("eta", "bisection_steps")),
        OptimizerSpec(
            "adafisher", "adam", _adafisher("adafisher"), frozenset({STATS}),
            description="optax_soaa.adafisher, stats from optax_soaa.flax",
            available=_adafisher_available,
            period=_period("adafisher", optax_soaa.adafisher, "stats_every")),
        OptimizerSpec(
            "adafisherw", "adam", _adafisher("adafisherw"), frozenset({STATS}),
            description="optax_soaa.adafisherw, stats from optax_soaa.flax",
            available=_adafisher_available,
            period=_period("adafisherw", optax_soaa.adafisherw, "stats_every")),
        OptimizerSpec(
            "adamw", "adam", _adamw, description="optax.adamw"),
        OptimizerSpec(
            "sgd", "sgd", _sgd,
            description="optax.sgd with momentum (+ L2 weight decay)"),
        OptimizerSpec(
            "sophia", "adam", _sophia, frozenset({OBJ_FN}),
            description="optax.contrib.sophia (Hutchinson), obj_fn=batch loss",
            period=_period("sophia", optax.contrib.sophia, "update_interval")),
        OptimizerSpec(
            "kfac", "adam", _kfac, diagnostic="norm_scale",
            description="kfac_jax.Optimizer (its own step; kfac-jax's"
                        " stochastic-training example settings)",
            available=kfac_baseline.unavailable_reason,
            step_diagnostics=("damping", "norm_scale"), kind="kfac",
            period=lambda hp: kfac_baseline.effective_settings(
                hp.get("kfac"))["inverse_update_period"]),
    )
}

DEFAULT_OPTIMIZERS = tuple(REGISTRY)


def make_injected(spec: OptimizerSpec, hp: Mapping[str, Any], total_steps: int):
  """(injected transformation, plain factory) for `spec` on a task.

  The injected one keeps the swept value in `state.hyperparams[spec.swept]`,
  which the trainer sets every step (base value x schedule multiplier).
  """
  factory = spec.build(hp, total_steps)

  # inject_hyperparams reads the factory's signature: give it one argument
  # named after the swept hyperparameter.
  if spec.swept == "kl_bound":
    def inner(kl_bound):
      return factory(kl_bound)
  else:
    def inner(learning_rate):
      return factory(learning_rate)

  injected = optax.inject_hyperparams(inner)(**{spec.swept: 1.0})
  return injected, factory
