"""optax's own shared optimizer tests, pointed at this library's optimizers.

The tests are those of the installed optax, read from its package at test
time (nothing of them is copied here): ``optax/_src/alias_test.py`` (the
tests every optax alias passes, complex64 parabola and Rosenbrock included)
and ``optax/contrib/_common_test.py`` (those of every contributed optimizer).
Each file's source is parsed and changed in two places only, then run:

* the lists of optimizers under test are replaced by ``UNDER_TEST`` below
  (assigned just before the test class, so the files' own lists and loops
  run unchanged before it), and their factory lookup (``_get_opt``,
  ``_get_opt_factory``) by ours;
* SOAA reads the loss: where a test passes ``value=`` to the optimizers that
  need it (its hooks: ``opt_name == 'polyak_sgd'``, ``opt_name in ['momo',
  ...]``), SOAA's names join that list. Without it SOAA would run with a
  fixed trust region and warn (``MissingValueWarning``).

What is run, and why the rest is not (``SHARED`` below):

* alias_test: ``test_optimization`` (10,000 steps on the parabola and the
  Rosenbrock function, float32 and complex64, gradients conjugated as optax's
  convention asks), ``test_optimizers_can_be_wrapped_in_inject_hyperparams``,
  ``test_state_shape_dtype_shard_stability`` on float16, complex64 and
  complex128, ``test_preserve_dtype`` and ``test_gradient_accumulation``
  (MultiSteps) on bfloat16; their float32 and bfloat16 cases are this
  library's own tests again (test_soaa.py, test_arturo.py,
  test_adafisher.py). ``test_explicit_dtype`` is not parameterised by the
  list (it tests sgd and adam); the L-BFGS tests are L-BFGS's.
* _common_test: ``test_optimizers`` (30,000 steps in one ``lax.scan``, after
  ``optax.tree.map_params``) on its matrix and mixed-tree targets (the
  parabola and Rosenbrock ones ran above),
  ``test_optimizers_accept_extra_args`` (with its check that the second call
  does not recompile) and
  ``test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such``
  (which reads the ``learning_rate`` annotation: a real
  ``optax.ScalarOrSchedule``). Its inject_hyperparams, preserve-dtype,
  MultiSteps and dtype-stability tests are alias_test's on float params
  only, so they are not run twice.

Optimizer settings:

* SOAA, each curvature: ``learning_rate=0.1`` (Adam's in alias_test),
  ``total_steps=10_000`` (alias_test's run length).
* arTuRO: the tuned Fashion-MNIST configuration of the benchmarks
  (``optax_soaa.benchmarks.tasks.ARTURO_FMNIST``, from the authors' config);
  it converges on every target as it is. arTuRO takes no ``learning_rate``
  (its step size is ``kl_bound``), so the schedule-annotation test skips it,
  as that test skips every optimizer without the argument; test_arturo.py
  tests ``kl_bound`` schedules.
* AdaFisher: these targets are plain arrays, not layers, so no statistics
  exist and every parameter takes the fallback step (the optimizer warns so;
  the warning is expected here and filtered). ``adafisher`` runs the
  reference's fallback (bias-corrected momentum, ``learning_rate=1e-2``:
  optax's ``sgd(1e-3, momentum=0.9)`` in EMA form) and ``adafisherw`` the
  ``"adam"`` fallback (``learning_rate=0.1``, Adam's). AdaFisher with
  statistics is tested in test_adafisher*.py and, on complex params, in
  test_complex.py.
"""

import ast
import pathlib
import re
import types

from absl.testing import parameterized
import optax
import pytest

import optax_soaa
from optax_soaa.benchmarks.tasks import ARTURO_FMNIST

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:AdaFisher's update got no statistics:UserWarning"),
    pytest.mark.filterwarnings("error::numpy.exceptions.ComplexWarning"),
]

OPTIMIZERS = {
    # name: (factory, kwargs)
    "soaa": (optax_soaa.soaa, dict(learning_rate=0.1, total_steps=10_000)),
    "soaa_variance": (optax_soaa.soaa, dict(
        learning_rate=0.1, total_steps=10_000, curvature="variance")),
    "soaa_none": (optax_soaa.soaa, dict(
        learning_rate=0.1, total_steps=10_000, curvature="none")),
    "arturo": (optax_soaa.arturo, dict(ARTURO_FMNIST)),
    "adafisher": (optax_soaa.adafisher, dict(learning_rate=1e-2)),
    "adafisherw": (optax_soaa.adafisherw, dict(
        learning_rate=0.1, fallback="adam")),
}
# The optimizers that read `value=`.
TAKE_VALUE = ("soaa", "soaa_variance", "soaa_none")
# The optax test hooks that pass `value=`: the optimizers named there.
VALUE_HOOKS = {"polyak_sgd", "momo"}

UNDER_TEST = tuple({"opt_name": name, "opt_kwargs": kwargs}
                   for name, (_, kwargs) in OPTIMIZERS.items())
# _common_test.py's entries also name a wrapper of the optimizer: none.
UNDER_TEST_UNWRAPPED = tuple(dict(entry, wrapper_name=None, wrapper_kwargs=None)
                             for entry in UNDER_TEST)

# Test methods run, each with the targets or dtypes it runs on (None: all of
# its cases). The cases left out are covered by this library's own tests
# (float32 and bfloat16 dtypes, MultiSteps) or by the other file.
SHARED = {
    # file under optax/: (test class, entries, {test method: cases})
    "_src/alias_test.py": ("AliasTest", UNDER_TEST, {
        "test_optimization": None,
        "test_optimizers_can_be_wrapped_in_inject_hyperparams": None,
        "test_preserve_dtype": {"bfloat16"},
        "test_state_shape_dtype_shard_stability": {
            "float16", "complex64", "complex128"},
        "test_gradient_accumulation": {"bfloat16"},
    }),
    "contrib/_common_test.py": ("ContribTest", UNDER_TEST_UNWRAPPED, {
        "test_optimizers": {"matrix_parabola", "mixed_tensor_target"},
        "test_optimizers_accept_extra_args": None,
        "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such":
            None,
    }),
}


class _Retarget(ast.NodeTransformer):
  """Points a shared test file at `UNDER_TEST` and SOAA at the value hooks."""

  def __init__(self, class_name):
    self.class_name = class_name
    self.lists_replaced = False
    self.hooks = 0

  def visit_Module(self, node):
    self.generic_visit(node)
    for i, stmt in enumerate(node.body):
      if isinstance(stmt, ast.ClassDef) and stmt.name == self.class_name:
        # Whatever the file calls its lists, the class reads ours.
        assign = ast.parse(
            "_OPTIMIZERS_UNDER_TEST = _MAIN_OPTIMIZERS_UNDER_TEST = "
            "_ALL_OPTIMIZERS_UNDER_TEST = __optax_soaa_under_test__").body
        node.body[i:i] = assign
        self.lists_replaced = True
        break
    return node

  def visit_If(self, node):
    self.generic_visit(node)
    # A hook is an `if` on opt_name whose body passes `value`, e.g.
    # `if opt_name == 'polyak_sgd': update_kwargs = {'value': value}`; other
    # tests of the same names (the list of optimizers that skip complex
    # params) are left alone.
    if "'value'" in "".join(ast.unparse(stmt) for stmt in node.body):
      node.test = _AddValueTakers(self).visit(node.test)
    return node


class _AddValueTakers(ast.NodeTransformer):
  """`opt_name == 'polyak_sgd'` -> `opt_name in ('polyak_sgd', 'soaa', ...)`."""

  def __init__(self, retarget):
    self.retarget = retarget

  def visit_Compare(self, node):
    if not (isinstance(node.left, ast.Name) and node.left.id == "opt_name"
            and len(node.ops) == 1):
      return node
    right = node.comparators[0]
    if isinstance(node.ops[0], ast.Eq) and isinstance(right, ast.Constant):
      names = [right.value]
    elif isinstance(node.ops[0], ast.In) and isinstance(
        right, (ast.List, ast.Tuple)) and all(
            isinstance(e, ast.Constant) for e in right.elts):
      names = [e.value for e in right.elts]
    else:
      return node
    if not VALUE_HOOKS & set(names):
      return node
    self.retarget.hooks += 1
    hook = ast.parse(f"opt_name in {tuple(names) + TAKE_VALUE!r}", mode="eval")
    return ast.copy_location(hook.body, node)


def _load(relative_path, class_name, under_test):
  path = pathlib.Path(optax.__file__).parent / relative_path
  if not path.exists():
    pytest.skip(f"optax {optax.__version__} ships no {relative_path}",
                allow_module_level=True)
  retarget = _Retarget(class_name)
  tree = ast.fix_missing_locations(retarget.visit(ast.parse(path.read_text())))
  # Loud failures if a new optax moves what is replaced: silently running
  # optax's own optimizers instead of ours would pass and prove nothing.
  assert retarget.lists_replaced, f"no class {class_name} in {path}"
  assert retarget.hooks, f"no value= hook in {path}"
  module = types.ModuleType(f"optax_shared_{path.stem}")
  module.__file__ = str(path)
  module.__optax_soaa_under_test__ = under_test
  exec(compile(tree, str(path), "exec"), module.__dict__)  # pylint: disable=exec-used
  factory = lambda name: OPTIMIZERS[name][0]
  module._get_opt_factory = factory  # _common_test.py's lookup.
  module._get_opt = lambda self, name: factory(name)  # alias_test.py's.
  return getattr(module, class_name)


def _test_name(method, generated):
  """``method[opt,target,dtype,...]`` from absl's record of the arguments."""
  params = getattr(generated, "__x_params_repr__", "")
  parts = [re.search(r"opt_name='(\w+)'", params).group(1)]
  parts += re.findall(r"_setup_(\w+) at", params)
  parts += re.findall(r"dtype=(?:<class 'jax\.numpy\.|')?(\w+)", params)
  parts += [f"wrap={w}" for w in re.findall(r"wrap=(\w+)", params)]
  return f"{method}[{'-'.join(parts)}]"


def _shared_case(relative_path):
  class_name, under_test, methods = SHARED[relative_path]
  shared = _load(relative_path, class_name, under_test)
  chosen = {}
  for name, fn in vars(shared).items():
    match = re.fullmatch(r"(test_\w+?)(\d+)", name)
    if not match or match.group(1) not in methods:
      continue
    name = _test_name(match.group(1), fn)
    cases = methods[match.group(1)]
    # `wrap` wraps optax's contributed wrappers; ours have none, and the two
    # cases would be the same test.
    if "wrap=True" in name or (
        cases is not None and not cases & set(re.split(r"[\[\]-]", name))):
      continue
    chosen[name.replace("-wrap=False", "")] = fn
  assert {n.split("[")[0] for n in chosen} == set(methods), sorted(chosen)
  assert {re.split(r"[\]-]", n.split("[")[1])[0] for n in chosen} == set(
      OPTIMIZERS)
  # The file's own helpers (setUp, _get_opt...) stay reachable through the
  # class's module globals; only the chosen tests are collected.
  return type(f"TestOptax{class_name}", (parameterized.TestCase,), chosen)


TestOptaxAliasTest = _shared_case("_src/alias_test.py")
TestOptaxContribTest = _shared_case("contrib/_common_test.py")
