"""End-to-end test of the benchmark tool on its smallest preset, and its parts."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_soaa

from optax_soaa import bench
from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import plans
from optax_soaa.benchmarks import report
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import summarize
from optax_soaa.benchmarks import tasks as tasks_lib
from optax_soaa.benchmarks import train as train_lib
from optax_soaa.benchmarks.report import tables

STEPS, FACTORS = 8, (0.5, 2.0)
ARGS = ["--steps", str(STEPS), "--optimizers", "soaa-variance",
        "--lrs", ",".join(map(str, FACTORS)), "--timing-pairs", "2",
        "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  import contextlib
  import io
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert bench.main(ARGS + ["--out", str(out)]) == 0
  return out, stdout.getvalue()


@pytest.fixture(scope="module")
def results(run_dir):
  return json.loads((run_dir[0] / "results.json").read_text())


def test_results_json_environment_and_task(results):
  env = results["environments"][0]
  assert results["schema_version"] == schema.SCHEMA_VERSION
  assert env["device"] == "CPU" or env["device"].startswith("GPU")
  assert env["jax"] == jax.__version__
  assert "--steps 8" in env["command"] and env["command"].startswith(
      "python -m optax_soaa.bench")
  assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", env["date"])
  task = results["task"]
  assert task["name"] == "digits-mlp" and task["num_steps"] == STEPS
  assert task["factors"] == list(FACTORS)
  # Adam is added as the reference even when not asked for.
  assert list(results["optimizers"]) == ["adam", "soaa-variance"]
  assert results["complete"] is True
  assert results["planned_optimizers"] == ["adam", "soaa-variance"]


@pytest.mark.parametrize("name", ["adam", "soaa-variance"])
def test_results_json_curves(results, name):
  r = results["optimizers"][name]
  assert r["status"] == "ok"
  center = results["task"]["centers"]["adam"]
  np.testing.assert_allclose(r["values"], [center * f for f in FACTORS],
                             rtol=1e-6)
  (curves,) = r["curves"]
  every = results["task"]["eval_every"]
  assert curves["step"] == list(range(0, STEPS + 1, every))
  for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
    arr = np.asarray(curves[key], np.float64)
    assert arr.shape == (len(curves["step"]), len(FACTORS))
    assert np.isfinite(arr).all()
  # Same initial params for every sweep value; training lowers the loss.
  test = np.asarray(curves["test_loss"])
  np.testing.assert_allclose(test[0, 0], test[0, 1], rtol=1e-6)
  assert (test[-1] < test[0]).all()
  assert 0 <= r["best_index"] < len(FACTORS)
  assert r["best_value"] == r["values"][r["best_index"]]
  assert r["final"]["test_loss"] == pytest.approx(
      test[-1, r["best_index"]], rel=1e-9)
  assert r["timing"]["step_time_s"] > 0 and r["timing"]["step_time_ratio"] > 0
  assert r["wall_s"] > curves["wall_s"] > 0
  assert r["execution"] == "sequential"  # auto, on the CPU


def test_results_json_measures_relative_to_adam(results):
  adam = results["optimizers"]["adam"]
  soaa = results["optimizers"]["soaa-variance"]
  assert results["target_test_loss"] == pytest.approx(
      adam["final"]["test_loss"])
  assert adam["steps_to_target"] is not None
  assert adam["steps_to_target"] <= STEPS
  assert adam["state_bytes_ratio"] == 1.0
  # SOAA (variance) keeps three moments against Adam's two (+ scalars).
  assert soaa["state_bytes_ratio"] == pytest.approx(1.5, abs=1e-3)
  for r in (adam, soaa):
    if r["steps_to_target"] is not None:
      assert r["seconds_to_target"] == pytest.approx(
          r["steps_to_target"] * r["timing"]["step_time_s"])


def test_soaa_dt_recorded_every_step_within_its_bounds(results):
  r = results["optimizers"]["soaa-variance"]
  (curves,) = r["curves"]
  dt = np.asarray(curves["per_step"]["dt"], np.float64)
  ratio = np.asarray(curves["per_step"]["trust_ratio"], np.float64)
  assert dt.shape == ratio.shape == (STEPS, len(FACTORS))
  assert ((dt >= 0.9 - 1e-6) & (dt <= 2.0 + 1e-6)).all()
  # The evaluation-time diagnostic is the per-step value at that step.
  at_eval = np.asarray(curves["diagnostic"][1:], np.float64)
  np.testing.assert_allclose(at_eval, dt[np.asarray(curves["step"][1:]) - 1],
                             rtol=1e-5)
  every = results["task"]["eval_every"]
  lower = np.asarray(curves["dt_at_lower"])
  upper = np.asarray(curves["dt_at_upper"])
  assert lower.shape == upper.shape == (STEPS // every, len(FACTORS))
  assert ((lower >= 0) & (upper >= 0) & (lower + upper <= 1 + 1e-9)).all()
  side = summarize.clip_side(np.asarray(curves["per_step"]["dt"], np.float32),
                              np.asarray(ratio, np.float32))
  np.testing.assert_allclose(lower, (side == -1).reshape(-1, every, 2).mean(1))
  # Against SOAA's bounds (gamma 0.1, T = the run's steps): a step read as
  # clipped sits on its bound; an unclipped one lies within them.
  t = np.arange(1, STEPS + 1)[:, None]
  low, high = 0.9 ** ((t - 1) / STEPS), 1 + 0.1 ** ((t - 1) / STEPS)
  on = lambda b: np.isclose(dt, b, rtol=1e-5)
  assert on(np.broadcast_to(low, dt.shape))[side == -1].all()
  assert on(np.broadcast_to(high, dt.shape))[side == 1].all()
  assert ((dt >= low - 1e-6) & (dt <= high + 1e-6))[side == 0].all()
  assert (side != 0).any()
  assert results["optimizers"]["adam"]["curves"][0]["diagnostic"][0] is None
  assert results["optimizers"]["adam"]["curves"][0]["per_step"] == {}


def test_clip_side_tells_which_bound_acted():
  dt = np.asarray([[0.9], [1.8], [1.8], [2.0]], np.float32)
  # step 1: 0.5 x 1 clipped up to 0.9; step 2: 2 x 0.9 unclipped; step 3:
  # 1 x 1.8 unclipped; step 4: 3 x 1.8 = 5.4 clipped down to 2.
  ratio = np.asarray([[0.5], [2.0], [1.0], [3.0]], np.float32)
  np.testing.assert_array_equal(summarize.clip_side(dt, ratio)[:, 0],
                                [-1, 0, 0, 1])


def test_markdown_table_written_and_printed(run_dir, results):
  out, stdout = run_dir
  md = (out / "results.md").read_text()
  assert md in stdout
  assert "| optimizer | swept | best value |" in md
  for name, r in results["optimizers"].items():
    row = next(l for l in md.splitlines() if l.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{r['final']['test_loss']:.4f}"
    assert cells[-1] == f"{r['state_bytes_ratio']:.2f}"
  assert results["environments"][0]["command"] in md


def test_table_notes_a_timed_step_the_training_disagrees_with(results):
  run = schema.Run.from_json(results)
  r = run.optimizers["soaa-variance"]
  r.timing.step_time_s, r.train_step_s = 0.2, 0.2 * 1.2  # within 25 %
  assert "its timing samples measured" not in report.markdown_report(run)
  r.train_step_s = 0.1  # trained at half the timed step
  table = report.markdown_report(run)
  assert ("`soaa-variance`: its timing samples measured 0.2 s a step and its"
          " training 0.1 s a step") in table
  assert "Step ratio uncertain (see the record below): `soaa-variance`" in (
      tables.compact_report(run, "x"))
  r.timing.step_time_s, r.train_step_s = 0.002, 0.001  # dispatch-bound
  assert "its timing samples measured" not in report.markdown_report(run)


@pytest.mark.parametrize("name", report.PLOT_FILES)
def test_plots_are_real_images(run_dir, name):
  import matplotlib.image
  img = matplotlib.image.imread(run_dir[0] / name)
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
  assert img[..., :3].std() > 0.01  # something was drawn


def test_benchmarks_md_from_results(run_dir, tmp_path, capsys):
  # --from-results trains nothing: it re-renders the table and plots beside
  # the JSON and writes BENCHMARKS.md, and the full protocol page beside it.
  copy = tmp_path / "copy"
  copy.mkdir()
  (tmp_path / "docs").mkdir()
  (copy / "results.json").write_text((run_dir[0] / "results.json").read_text())
  path = tmp_path / "BENCHMARKS.md"
  assert bench.main(["--from-results", str(copy / "results.json"),
                     "--note", "a caveat", "--write-benchmarks-md",
                     str(path)]) == 0
  assert (copy / "results.md").read_text() == (
      run_dir[0] / "results.md").read_text()
  assert all((copy / name).stat().st_size > 1000 for name in report.PLOT_FILES)
  text = path.read_text()
  lines = text.splitlines()
  assert lines[0] == "# Benchmarks"
  first_table = next(i for i, l in enumerate(lines) if l.startswith("|"))
  assert first_table < 30 and lines[first_table].startswith("| task: metric")
  assert "## Protocol, in short" in text
  assert "### copy (digits-mlp, sweep, 0.727 epochs)" in text
  assert "| soaa-variance | lr |" in text
  assert "device: CPU" in text and "- Note: a caveat" in text
  assert "<details>" in text
  protocol = (tmp_path / report.PROTOCOL_PAGE).read_text()
  assert "inject_hyperparams" in protocol and "jax.vmap" in protocol
  assert "| soaa-variance | lr |" in capsys.readouterr().out


def test_partial_run_is_flagged_in_the_report(results):
  run = schema.Run.from_json(results)
  partial = dataclasses.replace(
      run, complete=False, planned_optimizers=["adam", "soaa-variance", "sgd"])
  text = report.markdown_report(partial)
  assert "**partial run**" in text and "not run: sgd" in text
  assert "partial" not in report.markdown_report(run)


def test_unavailable_optimizer_is_reported_not_raised():
  task = tasks_lib.make_task("digits-mlp", steps=4, factors=FACTORS)
  runner = train_lib.TaskRunner(task, progress=False)
  spec = dataclasses.replace(opt_lib.REGISTRY["sgd"],
                             available=lambda: "not installed")
  r = runner.run(spec)
  assert r.status == "unavailable" and r.reason == "not installed"
  run = schema.Run(
      environments=[], task=schema.TaskInfo(**schema.clean(task.describe())),
      mode="sweep", seeds=[0], execution="sequential", optimizers={"sgd": r},
      complete=True, planned_optimizers=["sgd"])
  assert "| sgd | learning_rate | unavailable |" in tables.table_rows(run)[2]
  assert "`sgd`: unavailable: not installed" in tables.notes(run)


def test_registry_covers_the_issue():
  assert {"soaa", "soaa-variance", "arturo", "adafisher",
          "adafisherw", "adam", "adamw", "sgd", "sophia"} <= set(
              opt_lib.REGISTRY)
  assert opt_lib.REGISTRY["arturo"].swept == "kl_bound"
  assert opt_lib.REGISTRY["sophia"].extra_args == {opt_lib.OBJ_FN}
  assert opt_lib.REGISTRY["adafisher"].extra_args == {opt_lib.STATS}
  for name in ("soaa", "soaa-variance"):
    assert opt_lib.REGISTRY[name].extra_args == {opt_lib.VALUE}


def test_grad_fn_passes_each_optimizers_extra_args():
  task = tasks_lib.make_task("digits-mlp", steps=4)
  params = task.init_params(jax.random.key(0))
  batch = (jnp.asarray(task.train_x[:16]), jnp.asarray(task.train_y[:16]))
  rng = jax.random.key(1)

  def probe(name, opt_state=None):
    grad_fn = plans.make_grad_fn(opt_lib.REGISTRY[name], task.loss_fn)

    @jax.jit
    def f(params, opt_state):
      loss, _, extra = grad_fn(params, opt_state, batch, rng)
      # Callables cannot leave jit: evaluate them here.
      return loss, {k: v(params) if callable(v) else v
                    for k, v in extra.items()}

    return f(params, opt_state)

  loss, extra = probe("soaa-variance")
  assert set(extra) == {"value"} and extra["value"] == loss
  loss, extra = probe("sophia")
  assert set(extra) == {"obj_fn"}
  assert float(extra["obj_fn"]) == pytest.approx(float(loss), rel=1e-6)
  assert probe("adam")[1] == {}
  # AdaFisher: statistics on its refresh steps only (stats_due of the state).
  tx = optax_soaa.adafisher(1e-3, stats_every=2)
  state = tx.init(params)
  loss, extra = probe("adafisher", state)
  assert set(extra) == {"value", "stats"}
  assert float(jnp.sum(extra["stats"]["Dense_0"]["kernel"].s)) > 0
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params,
                       **extra)
  _, extra = probe("adafisher", state)  # Step 2 does not refresh: zeros.
  assert float(jnp.sum(extra["stats"]["Dense_0"]["kernel"].s)) == 0


@pytest.mark.parametrize("scale,gamma", [("adam", 0.1), ("sgd", 0.1),
                                         ("kl", 0.006)])
def test_step_schedule_multiplier(scale, gamma):
  task = tasks_lib.make_task("digits-mlp", steps=4)
  task.milestones = (5, 8)
  mult = task.schedule_multiplier(scale)
  got = [float(mult(jnp.asarray(s))) for s in (0, 4, 5, 7, 8, 100)]
  np.testing.assert_allclose(got, [1, 1, gamma, gamma, gamma**2, gamma**2],
                             rtol=1e-6)


def test_lm_task_batches_are_shifted_windows(tmp_path):
  path = tmp_path / "text.py"
  path.write_bytes(bytes(range(32, 127)) * 40)
  task = tasks_lib.make_task("lm", quick=True, steps=4, text_file=str(path))
  assert task.kind == "lm" and task.eval_sets["test"][0].shape[1] == 64
  idx = jnp.asarray(task.sampler(0).take(1)[0])
  x, y = task.get_batch(task.device_data(), idx)
  assert x.shape == y.shape == (task.batch_size, task.seq_len)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  params = jax.jit(task.init_params)(jax.random.key(0))
  loss = float(jax.jit(task.loss_fn)(params, (x, y), jax.random.key(1)))
  # An untrained byte model is near uniform over 256 values.
  assert abs(loss - math.log(256)) < 1.0


def test_step_timing_spans_the_optimizers_cost_period():
  """A step that is costly every 4th step is timed at its mean cost."""
  assert opt_lib.REGISTRY["sophia"].period({}) == 10  # optax's default
  assert opt_lib.REGISTRY["sophia"].period(
      {"sophia": {"update_interval": 3}}) == 3
  assert opt_lib.REGISTRY["adafisher"].period({}) == 100
  assert opt_lib.REGISTRY["adam"].period({}) == 1
  # kfac-jax's stochastic-training example refreshes inverses every 50.
  assert opt_lib.REGISTRY["kfac"].period({}) == 50
  task = tasks_lib.make_task("digits-mlp", steps=8)
  runner = train_lib.TaskRunner(task, progress=False, timing_pairs=1,
                                 timing_inner=3, min_sample_s=0.0)
  calls = []

  def fake_stepper(spec):
    def run(n):
      calls.append((spec.name, n))
      return 1.0
    return run, 1

  runner.stepper = fake_stepper
  spec = dataclasses.replace(opt_lib.REGISTRY["sgd"], name="periodic",
                             period=lambda hp: 4)
  timing = runner.time_step(spec)
  assert timing.cost_period == 4
  assert timing.timing_inner_steps == 4  # 3 rounded up to the period
  assert ("periodic", 4) in calls and ("adam", 4) in calls


def test_baseline_costs_script_quick(tmp_path):
  from optax_soaa.benchmarks import baseline_costs  # pylint: disable=g-import-not-at-top
  out = tmp_path / "costs.json"
  result = baseline_costs.main(["--quick", "--rounds", "1", "--json", str(out)])
  assert json.loads(out.read_text())["batch"] == 8
  assert set(result["sophia_hvp_s"]) == {"gradient", "hvp", "hvp in lax.cond"}
  assert all(v > 0 for v in result["sophia_hvp_s"].values())
  conv = result["conv_input_factor_s"]
  assert conv is None or all(v > 0 for v in conv.values())
