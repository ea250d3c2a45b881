"""Public signatures carry real annotations, as tools (optax's own tests among
them) read them: a schedule-taking argument is annotated
``optax.ScalarOrSchedule`` itself, not the string of postponed evaluation."""

import importlib
import inspect
import pkgutil

import optax
import pytest

import optax_soaa
import optax_soaa.checkpoint
import optax_soaa.flax

# The argument each optimizer takes an optax schedule for (None: no step
# size, as optax.scale_by_adam has none).
SCHEDULE_ARGS = {
    "soaa": "learning_rate",
    "scale_by_soaa": "learning_rate",
    "adafisher": "learning_rate",
    "adafisherw": "learning_rate",
    "scale_by_adafisher": None,
    "arturo": "kl_bound",
    "scale_by_arturo": "kl_bound",
}


def _public(module):
  names = getattr(module, "__all__", None) or [
      n for n in vars(module) if not n.startswith("_")]
  for name in names:
    obj = getattr(module, name)
    # Functions, and classes that annotate fields (states, LayerStats).
    if (inspect.isfunction(obj) or (
        inspect.isclass(obj) and "__annotations__" in vars(obj))) and (
            obj.__module__.startswith("optax_soaa")):
      yield f"{module.__name__}.{name}", obj


PUBLIC = dict(
    item for module in (optax_soaa, optax_soaa.flax, optax_soaa.checkpoint)
    for item in _public(module))


@pytest.mark.parametrize("name", sorted(k for k, v in SCHEDULE_ARGS.items() if v))
def test_schedule_arguments_are_annotated_scalar_or_schedule(name):
  parameter = inspect.signature(getattr(optax_soaa, name)).parameters[
      SCHEDULE_ARGS[name]]
  assert parameter.annotation is optax.ScalarOrSchedule


def test_every_public_optimizer_is_listed():
  optimizers = {
      name for name in optax_soaa.__all__
      if inspect.isfunction(getattr(optax_soaa, name))
      and inspect.signature(getattr(optax_soaa, name)).return_annotation
      is optax.GradientTransformationExtraArgs}
  assert optimizers == set(SCHEDULE_ARGS)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_annotations_are_objects_not_strings(name):
  annotations = inspect.get_annotations(PUBLIC[name])
  assert annotations
  strings = {k: v for k, v in annotations.items() if isinstance(v, str)}
  assert not strings, strings


def test_no_module_postpones_annotations():
  postponed = []
  for info in pkgutil.walk_packages(optax_soaa.__path__, "optax_soaa."):
    module = importlib.import_module(info.name)
    if vars(module).get("annotations") is not None and getattr(
        vars(module)["annotations"], "compiler_flag", None):
      postponed.append(info.name)
  assert not postponed, postponed
