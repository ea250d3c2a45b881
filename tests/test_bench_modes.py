"""The benchmark tool's run modes: resume, tuned, epochs, plans and K-FAC."""

import contextlib
import dataclasses
import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_soaa import bench
from optax_soaa.benchmarks import kfac_baseline
from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import record
from optax_soaa.benchmarks import report
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import summarize
from optax_soaa.benchmarks import tasks as tasks_lib
from optax_soaa.benchmarks import train as train_lib
from optax_soaa.benchmarks.report import tables

from tests.test_bench_data import _write_idx

BASE = ["--steps", "4", "--lrs", "0.5,2", "--timing-pairs", "1",
        "--no-progress"]


def _main(args):
  with contextlib.redirect_stdout(io.StringIO()):
    return bench.main(args)


def _load(out):
  return json.loads((out / schema.RESULTS_FILE).read_text())


def _save(out, payload):
  (out / schema.RESULTS_FILE).write_text(json.dumps(payload))


def _md(payload):
  return report.markdown_report(schema.Run.from_json(payload))


# A timing for runs that do not measure one.
TIMING = schema.Timing(step_time_ratio=1.0, step_time_s=1.0,
                       adam_step_time_s=1.0, timing_pairs=1,
                       timing_inner_steps=1, state_bytes=1, compile_s=0.0,
                       timing_wall_s=0.0)


def _summarized(task, results):
  """A sweep run of `results` (name -> OptimizerResult), summarized."""
  return summarize.summarize(schema.Run(
      environments=[], task=schema.TaskInfo(**schema.clean(task.describe())),
      mode="sweep", seeds=[0], execution="sequential", optimizers=results,
      complete=True, planned_optimizers=list(results)))


# -- resume ---------------------------------------------------------------------


def _record_training(monkeypatch):
  """The names of the optimizers trained from now on, in order."""
  trained = []
  original = train_lib.TaskRunner._train_seed

  def train_seed(self, plan, spec, values, seed, bar):
    trained.append(spec.name)
    return original(self, plan, spec, values, seed, bar)

  monkeypatch.setattr(train_lib.TaskRunner, "_train_seed", train_seed)
  return trained


def test_stopped_run_keeps_finished_seeds_and_resume_skips_them(
    tmp_path, monkeypatch):
  out = tmp_path / "run"
  trained, stop = [], [True]
  original = train_lib.TaskRunner._train_seed

  def train_seed(self, plan, spec, values, seed, bar):
    if spec.name == "sgd" and seed == 1 and stop:
      stop.clear()
      raise KeyboardInterrupt  # a user stopping the run mid-way
    trained.append((spec.name, seed))
    return original(self, plan, spec, values, seed, bar)

  monkeypatch.setattr(train_lib.TaskRunner, "_train_seed", train_seed)
  args = BASE + ["--optimizers", "sgd", "--seeds", "2", "--out", str(out)]
  with pytest.raises(KeyboardInterrupt):
    _main(args)
  assert trained == [("adam", 0), ("adam", 1), ("sgd", 0)]
  stopped = _load(out)
  assert stopped["complete"] is False
  assert [c["seed"] for c in stopped["optimizers"]["adam"]["curves"]] == [0, 1]
  assert [c["seed"] for c in stopped["optimizers"]["sgd"]["curves"]] == [0]
  assert "**partial run**" in _md(stopped)

  trained.clear()
  assert _main(args + ["--resume"]) == 0
  # Only the missing seed trained; the finished ones are kept as they were.
  assert trained == [("sgd", 1)]
  done = _load(out)
  assert done["complete"] is True
  assert len(done["environments"]) == 2
  assert [c["seed"] for c in done["optimizers"]["sgd"]["curves"]] == [0, 1]
  assert done["optimizers"]["sgd"]["curves"][0] == (
      stopped["optimizers"]["sgd"]["curves"][0])
  assert done["optimizers"]["adam"]["curves"] == (
      stopped["optimizers"]["adam"]["curves"])
  assert done["wall_s"] > stopped["wall_s"]
  assert "resumed: `python -m optax_soaa.bench" in _md(done)


def test_resume_with_other_optimizers_keeps_the_finished_ones(
    tmp_path, monkeypatch):
  out = tmp_path / "run"
  _main(BASE + ["--optimizers", "sgd", "--out", str(out)])
  first = _load(out)
  # A stopped run (adamw planned, not run) that the resume completes.
  first["complete"], first["planned_optimizers"] = False, ["adam", "sgd",
                                                           "adamw"]
  _save(out, first)
  trained = _record_training(monkeypatch)
  _main(BASE + ["--optimizers", "adamw", "--out", str(out), "--resume"])
  assert trained == ["adamw"]
  done = _load(out)
  assert list(done["optimizers"]) == ["adam", "sgd", "adamw"]
  assert done["planned_optimizers"] == ["adam", "sgd", "adamw"]
  assert done["optimizers"]["sgd"] == first["optimizers"]["sgd"]
  assert done["complete"] is True
  assert "| sgd |" in _md(done)


def test_resume_trains_again_an_optimizer_whose_settings_changed(
    tmp_path, monkeypatch, capsys):
  out = tmp_path / "run"
  _main(BASE + ["--optimizers", "sgd", "--out", str(out)])
  first = _load(out)
  # As if sgd had run with another fixed setting (a changed default).
  first["optimizers"]["sgd"]["hp"] = {"momentum": 0.5}
  _save(out, first)
  trained = _record_training(monkeypatch)
  _main(BASE + ["--optimizers", "sgd", "--out", str(out), "--resume"])
  assert trained == ["sgd"]  # adam's settings did not change: kept
  assert _load(out)["optimizers"]["sgd"]["hp"] == {"momentum": 0.9}
  # Not named again: kept as it ran, and the console says so.
  again = _load(out)
  again["optimizers"]["sgd"]["hp"] = {"momentum": 0.5}
  _save(out, again)
  capsys.readouterr()
  _main(BASE + ["--optimizers", "adamw", "--out", str(out), "--resume"])
  assert "--resume: sgd is kept as it ran" in capsys.readouterr().err
  assert _load(out)["optimizers"]["sgd"]["hp"] == {"momentum": 0.5}


def test_resume_refuses_a_different_run(tmp_path):
  out = tmp_path / "run"
  _main(BASE + ["--optimizers", "adam", "--out", str(out)])
  with pytest.raises(SystemExit, match="num_steps"):
    _main(["--steps", "8"] + BASE[2:] + ["--optimizers", "adam", "--out",
                                         str(out), "--resume"])


# -- tuned mode -------------------------------------------------------------------


def test_tuned_mode_takes_the_sweeps_picked_values(tmp_path, monkeypatch):
  sweep = tmp_path / "sweep"
  _main(BASE + ["--optimizers", "soaa", "--out", str(sweep)])
  with pytest.raises(SystemExit, match="no tuned value for adam, soaa"):
    _main(BASE + ["--optimizers", "soaa", "--tuned", "--out",
                  str(tmp_path / "x")])
  tuned = tmp_path / "tuned"
  # An unavailable optimizer needs no tuned value: it is listed as such.
  monkeypatch.setitem(opt_lib.REGISTRY, "kfac", dataclasses.replace(
      opt_lib.REGISTRY["kfac"], available=lambda: "not installed here"))
  _main(BASE + ["--optimizers", "soaa", "kfac", "--tuned", "--seeds", "2",
                "--tuned-from", str(sweep / schema.RESULTS_FILE),
                "--out", str(tuned)])
  picked, got = _load(sweep), _load(tuned)
  assert got["optimizers"]["kfac"]["status"] == "unavailable"
  assert got["mode"] == "tuned" and got["seeds"] == [0, 1]
  for name in ("adam", "soaa"):
    r = got["optimizers"][name]
    assert r["values"] == [pytest.approx(picked["optimizers"][name]["best_value"])]
    assert "picked by the sweep" in r["value_source"]
    assert len(r["curves"]) == 2
    assert np.asarray(r["curves"][0]["test_loss"]).shape[1] == 1
  md = _md(got)
  assert "mode: **tuned**" in md and "| tuned value |" in md
  assert "mean ± sd (n=2)" in md


def test_tuned_value_source_names_the_invocation_that_picked_it(tmp_path):
  sweep = tmp_path / "sweep"
  _main(BASE + ["--optimizers", "soaa", "--out", str(sweep)])
  _main(BASE + ["--optimizers", "sgd", "--out", str(sweep), "--resume"])
  results = _load(sweep)
  assert [results["optimizers"][o]["environment_index"]
          for o in ("adam", "soaa", "sgd")] == [0, 0, 1]
  path = str(sweep / schema.RESULTS_FILE)
  task = tasks_lib.make_task("digits-mlp", steps=8)
  got = bench.tuned_values(task, ["soaa", "sgd"], path)
  assert "--optimizers soaa" in got["soaa"][1]
  assert "--optimizers sgd" in got["sgd"][1]
  # A results file that does not record it says so instead of guessing.
  for r in results["optimizers"].values():
    del r["environment_index"]
  _save(sweep, results)
  got = bench.tuned_values(task, ["sgd"], path)
  assert "run over 2 invocations" in got["sgd"][1]
  assert "not recorded" in got["sgd"][1]


# -- epochs -----------------------------------------------------------------------


def _fake_fmnist(directory, n_train, n_test):
  rng = np.random.default_rng(0)
  directory.mkdir()
  for stem, n in (("train", n_train), ("t10k", n_test)):
    _write_idx(directory / f"{stem}-images-idx3-ubyte.gz",
               rng.integers(0, 256, (n, 28, 28), np.uint8), True)
    _write_idx(directory / f"{stem}-labels-idx1-ubyte.gz",
               rng.integers(0, 10, (n,), np.uint8), True)


def test_epochs_set_steps_and_milestones(tmp_path):
  _fake_fmnist(tmp_path / "fm", n_train=4 * 255 + 7, n_test=20)
  task = tasks_lib.make_task("fmnist-cnn", epochs=3, data_dir=tmp_path / "fm")
  assert task.steps_per_epoch == 4  # the partial batch is dropped
  assert task.num_steps == 12 and task.eval_every == 3
  assert task.milestones == (6, 9)  # 1/2 and 3/4 of training
  assert task.describe()["epochs"] == 3
  assert task.describe()["eval_sizes"] == {"train": 4 * 255 + 7, "test": 20}
  # The tuned mode's published values: the arTuRO authors' configs.
  assert task.tuned["adam"][0] == tasks_lib.ADAM_FMNIST["lr"]
  assert task.tuned["adamw"][0] == tasks_lib.ADAMW_FMNIST["lr"]
  assert task.tuned["sgd"][0] == tasks_lib.SGD_FMNIST["lr"]
  assert task.tuned["arturo"][0] == tasks_lib.ARTURO_FMNIST["kl_bound"]
  assert "ALRhub/arturo" in task.tuned["adam"][1]
  assert bench.tuned_values(task, ["adam", "arturo"], None) == {
      k: task.tuned[k] for k in ("adam", "arturo")}
  with pytest.raises(SystemExit, match="no tuned value for soaa"):
    bench.tuned_values(task, ["adam", "soaa"], None)
  assert tasks_lib.milestones_at_fractions(28200) == (14100, 21150)
  digits = tasks_lib.make_task("digits-mlp", epochs=2)
  assert digits.num_steps == 2 * digits.steps_per_epoch
  with pytest.raises(ValueError, match="either steps or epochs"):
    tasks_lib.make_task("digits-mlp", steps=4, epochs=1)
  with pytest.raises(ValueError, match="epochs"):
    tasks_lib.make_task("lm", quick=True, epochs=1)
  with pytest.raises(SystemExit):  # argparse: mutually exclusive
    bench.build_parser().parse_args(["--steps", "4", "--epochs", "1"])


def test_adafisher_refresh_period_per_task(tmp_path):
  # Classification: the library default (the authors' image TCov); lm: the
  # authors' language-model script's TCov.
  assert "stats_every" not in tasks_lib.make_task("digits-mlp", steps=4).hp[
      "adafisher"]
  path = tmp_path / "text.py"
  path.write_bytes(bytes(range(32, 127)) * 40)
  lm = tasks_lib.make_task("lm", quick=True, steps=4, text_file=str(path))
  assert lm.hp["adafisher"]["stats_every"] == 10
  assert lm.hp["adafisherw"]["stats_every"] == 10
  text = report.protocol_text()
  assert "every 100 steps" in text and "every 10 steps on `lm`" in text


# -- execution plans ------------------------------------------------------------


def test_vmapped_and_sequential_plans_agree():
  task = tasks_lib.make_task("digits-mlp", steps=4, factors=(0.5, 2.0))
  spec = opt_lib.REGISTRY["soaa-variance"]
  out = {}
  for execution in ("vmap", "sequential"):
    runner = train_lib.TaskRunner(task, progress=False, execution=execution)
    out[execution] = runner.run(spec, timing=TIMING)
    assert out[execution].status == "ok", out[execution].reason
  a, b = (out[k].curves[0] for k in ("vmap", "sequential"))
  for key in ("test_loss", "train_accuracy", "batch_loss"):
    np.testing.assert_allclose(np.asarray(getattr(a, key)[1:], np.float64),
                               np.asarray(getattr(b, key)[1:], np.float64),
                               rtol=2e-4)
  np.testing.assert_allclose(a.per_step["dt"], b.per_step["dt"], rtol=2e-4)
  assert train_lib.resolve_execution("auto", "cpu") == "sequential"
  assert train_lib.resolve_execution("auto", "gpu") == "vmap"
  with pytest.raises(ValueError, match="execution"):
    train_lib.resolve_execution("fast")


def test_arturo_eta_and_bisection_steps_recorded():
  task = tasks_lib.make_task("digits-mlp", steps=4, factors=(1.0,))
  runner = train_lib.TaskRunner(task, progress=False)
  r = runner.run(opt_lib.REGISTRY["arturo"], timing=TIMING)
  per_step = r.curves[0].per_step
  eta = np.asarray(per_step["eta"])
  steps = np.asarray(per_step["bisection_steps"])
  assert eta.shape == steps.shape == (4, 1)
  assert (eta > 0).all() and (steps >= 0).all()
  np.testing.assert_array_equal(steps, np.round(steps))
  run = _summarized(task, {"arturo": r})
  assert "`arturo` took" in report.diagnostics_summary(run)


# -- K-FAC ------------------------------------------------------------------------


class _FakeKfac:
  """The part of kfac_jax's API the benchmark uses: momentum SGD behind it.

  Records what the adapter passes, to check the wiring without kfac-jax.
  """

  __version__ = "fake"

  def __init__(self):
    self.registered, self.calls, self.dampings = [], [], []
    fake = self

    class Optimizer:

      def __init__(self, value_and_grad_func, l2_reg, value_func_has_rng,
                   num_burnin_steps, **kwargs):
        assert value_func_has_rng and l2_reg == 0.0
        assert not kwargs["use_adaptive_learning_rate"]
        self.vg, self.burnin = value_and_grad_func, num_burnin_steps
        fake.block_ctors = kwargs.get("layer_tag_to_block_ctor")
        fake.kwargs = kwargs

      def init(self, params, rng, batch):
        del rng, batch
        return jax.tree.map(jnp.zeros_like, params)

      def step(self, params, state, rng, data_iterator=None, batch=None,
               learning_rate=None, momentum=None, damping=None,
               global_step_int=None):
        fake.dampings.append(damping)
        if data_iterator is not None:
          burn = [next(data_iterator) for _ in range(self.burnin)]
          batch = next(data_iterator)
          fake.calls.append(("burnin", len(burn)))
        loss, grads = self.vg(params, rng, batch)
        state = jax.tree.map(lambda m, g: momentum * m + g, state, grads)
        params = jax.tree.map(lambda p, m: p - learning_rate * m, params, state)
        fake.calls.append(("step", global_step_int, float(learning_rate)))
        # kfac-jax's lr² gᵀF⁻¹g; here gᵀg, so the constraint can bind.
        sq = learning_rate ** 2 * sum(
            jnp.vdot(g, g) for g in jax.tree.leaves(grads))
        return params, state, dict(loss=loss, damping=damping,
                                   scaled_grad_norm_sq=sq)

    class Conv2DTwoKroneckerFactored:
      pass

    self.Optimizer = Optimizer
    self.Conv2DTwoKroneckerFactored = Conv2DTwoKroneckerFactored

  def register_softmax_cross_entropy_loss(self, logits, targets, weight):
    self.registered.append((logits.shape, targets.shape, weight))


def test_kfac_explicit_patches_conv_block_matches_kfac_jax():
  """The CPU conv block's factors equal kfac-jax's own (real kfac-jax only)."""
  kfac_jax = pytest.importorskip("kfac_jax")
  if kfac_baseline.unavailable_reason():
    pytest.skip(kfac_baseline.unavailable_reason())
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(6, (3, 2), strides=(2, 1), padding="SAME")(x))
      x = nn.Conv(4, (2, 2), padding="VALID", use_bias=False)(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  net = Net()
  x = jax.random.normal(jax.random.key(0), (5, 9, 8, 3))
  y = jnp.arange(5) % 3
  params = net.init(jax.random.key(1), x)

  def loss(p, batch):
    logits = net.apply(p, batch[0])
    kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[1]).mean()

  def factors(ctors):
    est = kfac_jax.BlockDiagonalCurvature(
        loss, layer_tag_to_block_ctor=ctors,
        default_estimation_mode="fisher_empirical")
    args = (params, (x, y))
    state = est.init(jax.random.key(2), args, None, None)
    state = est.update_curvature_matrix_estimate(
        state, 0.0, 1.0, 0.0, 5, jax.random.key(3), args)
    return [type(b).__name__ for b in est.blocks], state

  ours = kfac_baseline._explicit_patches_conv_block(kfac_jax)
  names, got = factors({"conv2d": ours})
  ref_names, want = factors(None)
  assert names.count(ours.__name__) == 2 and ours.__name__ not in ref_names
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)


def test_kfac_unavailable_when_not_installed(monkeypatch):
  def missing():
    raise ImportError("No module named 'kfac_jax'")

  monkeypatch.setattr(kfac_baseline, "_import", missing)
  kfac_baseline.unavailable_reason.cache_clear()
  try:
    reason = opt_lib.REGISTRY["kfac"].available()
    assert "kfac-jax is not installed" in reason and "`kfac` extra" in reason
    task = tasks_lib.make_task("digits-mlp", steps=4)
    r = train_lib.TaskRunner(task, progress=False).run(opt_lib.REGISTRY["kfac"])
    assert r.status == "unavailable" and r.reason == reason
  finally:
    kfac_baseline.unavailable_reason.cache_clear()


def test_kfac_runs_through_its_own_optimizer_api(monkeypatch):
  fake = _FakeKfac()
  monkeypatch.setattr(kfac_baseline, "_import", lambda: fake)
  kfac_baseline.unavailable_reason.cache_clear()
  try:
    assert opt_lib.REGISTRY["kfac"].available() is None
    task = tasks_lib.make_task("digits-mlp", steps=8, factors=(1.0, 4.0))
    task.milestones = (4,)
    runner = train_lib.TaskRunner(task, progress=False, timing_pairs=1)
    fake.calls.clear()
    r = runner.run(opt_lib.REGISTRY["kfac"])
  finally:
    kfac_baseline.unavailable_reason.cache_clear()
  assert r.status == "ok", r.reason
  assert r.execution == "sequential"
  # On the CPU, kfac-jax's conv blocks get their input factor from explicit
  # patches (kfac_baseline's docstring says why).
  assert issubclass(fake.block_ctors["conv2d"], fake.Conv2DTwoKroneckerFactored)
  # Burn-in once per member, at its first step, then one step per batch.
  steps = [c for c in fake.calls if c[0] == "step"]
  members = [s for s in steps if s[1] == 0]
  assert fake.calls.count(("burnin", 5)) >= 2
  # The swept learning rate times the task's step schedule (x0.1 at step 4).
  lr = task.centers["adam"]
  trained = steps[-16:]
  np.testing.assert_allclose([s[2] for s in trained[:8]],
                             [lr] * 4 + [lr * 0.1] * 4, rtol=1e-6)
  assert [s[1] for s in trained[:8]] == list(range(8))
  assert len(members) >= 2
  assert fake.registered[0][2] == 1.0  # classification: weight 1
  test = np.asarray(r.curves[0].test_loss, np.float64)
  assert test.shape == (5, 2) and (test[-1] < test[0]).all()
  # kfac-jax's stochastic-training example: fixed damping given every step,
  # a norm constraint, the slow curvature average; all recorded.
  settings = kfac_baseline.SETTINGS
  assert not fake.kwargs["use_adaptive_damping"]
  assert fake.kwargs["norm_constraint"] == settings["norm_constraint"]
  assert fake.kwargs["curvature_ema"] == settings["curvature_ema"]
  assert fake.kwargs["inverse_update_period"] == settings[
      "inverse_update_period"]
  np.testing.assert_allclose(fake.dampings, settings["damping"])
  assert r.hp["norm_constraint"] == settings["norm_constraint"]
  per_step = r.curves[0].per_step
  assert np.asarray(per_step["damping"]).shape == (8, 2)
  scale = np.asarray(per_step["norm_scale"], np.float64)
  assert scale.shape == (8, 2) and (scale <= 1).all() and (scale > 0).all()
  run = _summarized(task, {"kfac": r})
  want = tables._percent(  # pylint: disable=protected-access
      100 * np.mean(scale[:, r.best_index] < 1 - 1e-6))
  summary = report.diagnostics_summary(run)
  assert (f"`kfac`'s norm constraint shortened the step on {want} % of"
          " steps") in summary


def test_real_kfac_trains_digits():
  # Probed here, not at collection: the probe compiles a small K-FAC step.
  reason = kfac_baseline.unavailable_reason()
  if reason is not None:
    pytest.skip(reason)
  task = tasks_lib.make_task("digits-mlp", steps=4, factors=(1.0,))
  r = train_lib.TaskRunner(task, progress=False, timing_pairs=1).run(
      opt_lib.REGISTRY["kfac"])
  assert r.status == "ok", r.reason
  test = np.asarray(r.curves[0].test_loss, np.float64)
  assert np.isfinite(test).all()


def test_plan_prints_the_expected_wall_time_and_trains_nothing(
    tmp_path, capsys):
  out = tmp_path / "run"
  assert bench.main(BASE + ["--optimizers", "adam", "--out", str(out),
                            "--plan"]) == 0
  err = capsys.readouterr().err
  assert "adam:" in err and "ms/step" in err
  assert "expected wall time about" in err
  assert not out.exists()


@pytest.mark.parametrize("direct_url, expected", [
    (None, "0.0.8"),
    ('{"url": "https://github.com/google-deepmind/kfac-jax", "vcs_info":'
     ' {"vcs": "git", "commit_id": "babd8539f2e1aa0c7d1b2c3d4e5f60718293a4b5"}}',
     "0.0.8 (git babd8539f2e1)"),
])
def test_results_record_which_kfac_jax_ran(monkeypatch, direct_url, expected):
  # 0.0.8 from PyPI and kfac-jax's GitHub main share a version number; the
  # environment tells them apart by the commit pip recorded.
  dist = types.SimpleNamespace(
      version="0.0.8",
      read_text=lambda name: direct_url if name == "direct_url.json" else None)
  monkeypatch.setattr(record.importlib.metadata, "distribution",
                      lambda name: dist)
  env = record.environment(["bench"])
  assert env.kfac_jax == expected


def test_results_without_kfac_jax_do_not_name_it(monkeypatch):
  def missing(name):
    raise record.importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(record.importlib.metadata, "distribution", missing)
  env = record.environment(["bench"])
  assert env.kfac_jax is None
  assert "kfac_jax" not in schema.to_json_value(env)


def test_recorded_commit_is_modified_only_by_the_package(tmp_path):
  # A checkout whose results changed still ran its commit's code; one whose
  # package changed did not.
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  repo = tmp_path / "repo"
  (repo / "optax_soaa" / "benchmarks").mkdir(parents=True)
  (repo / "results").mkdir()
  fake_report = repo / "optax_soaa" / "benchmarks" / "report.py"
  fake_report.write_text("# code\n")
  (repo / "results" / "r.json").write_text("{}\n")
  git = lambda *a: subprocess.run(
      ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
       *a], check=True, capture_output=True, text=True).stdout.strip()
  git("init", "-q")
  git("add", ".")
  git("commit", "-qm", "init")
  head = git("rev-parse", "--short", "HEAD")
  orig = record.ROOT
  try:
    record.ROOT = repo
    (repo / "results" / "r.json").write_text('{"a": 1}\n')
    assert record.git_commit() == head
    fake_report.write_text("# changed\n")
    assert record.git_commit() == head + "+modified"
  finally:
    record.ROOT = orig
