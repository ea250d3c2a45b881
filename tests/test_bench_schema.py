"""The typed results schema: every committed results file, migrations, merging."""

import copy
import dataclasses
import json
import pathlib
import subprocess

import numpy as np
import pytest

from optax_soaa.benchmarks import pipeline
from optax_soaa.benchmarks import record
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import summarize
from optax_soaa.benchmarks.report import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = sorted(ROOT.glob("results/bench/**/results.json"))


def test_committed_results_exist():
  assert len(COMMITTED) >= 5


@pytest.mark.parametrize("path", COMMITTED,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_results_file_loads_and_round_trips(path):
  data = json.loads(path.read_text())
  run = schema.load(path)
  assert run.schema_version == schema.SCHEMA_VERSION
  assert run.to_json() == json.loads(json.dumps(schema.migrate(data)))
  again = schema.Run.from_json(json.loads(schema.to_text(run)))
  assert again == run
  for r in run.optimizers.values():
    if r.summarized:  # the stored summary is what the curves give
      fresh = copy.deepcopy(r)
      summarize.summarize_result(fresh, run.task.select_by)
      assert fresh.best_index == r.best_index
      assert fresh.final == pytest.approx(r.final, nan_ok=True)


def _version_1(tmp_path):
  """A version-1 file as the tool wrote it: paths as typed, copies."""
  env = dict(date="2026-01-01 00:00 UTC", machine="m", device="CPU",
             python="3", jax="j", optax="o", flax="f", git_commit="abc",
             command="python -m optax_soaa.bench --tuned --tuned-from"
                     " /home/someone/repo/results/bench/sweep/results.json"
                     " --out /scratch/out/fmnist-cnn10")
  timing = dict(step_time_ratio=1.0, step_time_s=0.5, adam_step_time_s=0.5,
                timing_pairs=1, timing_inner_steps=3, state_bytes=10,
                compile_s=1.0, timing_wall_s=2.0)
  result = dict(
      name="adam", description="optax.adam", swept="learning_rate",
      scale="adam", extra_args=[], diagnostic=None, step_diagnostics=[],
      status="ok", values=[0.1], factors=[1.0], center=0.1, hp={},
      execution="sequential", curves=[], seeds=[], timing=timing, **timing,
      wall_s=3.0, seconds_per_step=0.5, dt_at_bounds=None,
      value_source="picked by the sweep /home/someone/repo/results/bench/"
                   "sweep/results.json (`python -m optax_soaa.bench --out"
                   " /tmp/x/sweep`, 2026-01-01 00:00 UTC, commit abc)")
  task = json.loads((COMMITTED[0]).read_text())["task"]
  return dict(environment=env, environments=[env], task=task, mode="tuned",
              seeds=[0], execution="sequential", optimizers={"adam": result},
              complete=True, planned_optimizers=["adam"],
              target_test_loss=None, wall_s=3.0)


def test_version_1_is_migrated_without_machine_paths(tmp_path):
  data = _version_1(tmp_path)
  run = schema.Run.from_json(data)
  assert run.environment.command == (
      "python -m optax_soaa.bench --tuned --tuned-from"
      " results/bench/sweep/results.json --out <elsewhere>/fmnist-cnn10")
  r = run.optimizers["adam"]
  assert r.timing.step_time_s == 0.5 and r.dt_at_bounds is None
  assert r.value_source.startswith("picked by the sweep sweep (`python -m")
  assert "--out <elsewhere>/sweep`" in r.value_source
  text = schema.to_text(run)
  assert "/home/" not in text and "/tmp/" not in text
  assert "seconds_per_step" not in text and '"environment"' not in text
  with pytest.raises(ValueError, match="newer"):
    schema.migrate(dict(data, schema_version=schema.SCHEMA_VERSION + 1))
  with pytest.raises(ValueError, match="unknown fields"):
    schema.Run.from_json(dict(run.to_json(), surprise=1))


def test_recorded_command_names_no_machine_directory(tmp_path):
  root = tmp_path / "checkout"
  inside = root / "results" / "bench" / "x"
  got = record.portable_command(
      ["python", "-m", "optax_soaa.bench", "--out", str(inside),
       f"--tuned-from={root}/results/bench/s/results.json", "--out",
       str(tmp_path / "scratch" / "run 1"), "--lrs", "1,2", "rel/dir"],
      root=root)
  assert got == ("python -m optax_soaa.bench --out results/bench/x"
                 " --tuned-from=results/bench/s/results.json"
                 " --out '<elsewhere>/run 1' --lrs 1,2 rel/dir")


def _tracked_files():
  try:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"],
                         capture_output=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  return [ROOT / p for p in out.stdout.decode().split("\0") if p]


# Directories of a build or home on the machines that ran the code.
MACHINE_DIRS = ("/work/", "/home/", "/root/", "/tmp/", "/Users/")


def test_no_tracked_file_names_a_machine_directory():
  found = []
  for path in _tracked_files():
    if not path.is_file() or path == pathlib.Path(__file__):
      continue
    text = path.read_bytes().decode("utf-8", "replace")
    found += [f"{path.relative_to(ROOT)}: {d}" for d in MACHINE_DIRS
              if d in text]
  assert not found, found


def _sweep_run(values, seed_scores, name="adam"):
  """A one-seed sweep of `name` whose final test accuracies are given."""
  task = schema.load(COMMITTED[0]).task
  n = len(values)
  curves = [schema.SeedCurves(
      seed=0, step=[0, 1], train_loss=[[1.0] * n, [0.5] * n],
      train_accuracy=[[0.1] * n, [0.5] * n],
      test_loss=[[1.0] * n, [1.0 - s for s in seed_scores]],
      test_accuracy=[[0.1] * n, list(seed_scores)],
      batch_loss=[None, [0.7] * n], diagnostic=[None, None],
      per_step={"dt": [list(range(n))]}, measured_step_s=0.1,
      first_interval_s=1.0, wall_s=1.0)]
  timing = schema.Timing(1.0, 0.1, 0.1, 1, 1, 8, 0.0, 0.0, cost_period=1)
  r = schema.OptimizerResult(
      name=name, description="", swept="learning_rate", scale="adam",
      extra_args=[], diagnostic=None, step_diagnostics=[], values=list(values),
      factors=list(values), center=1.0, curves=curves, seeds=[0],
      timing=timing, wall_s=2.0, environment_index=0)
  task = dataclasses.replace(task, select_by="test_accuracy")
  return summarize.summarize(schema.Run(
      environments=[schema.load(COMMITTED[0]).environment], task=task,
      mode="sweep", seeds=[0], execution="sequential",
      optimizers={name: r}, complete=True, planned_optimizers=[name]))


def test_a_widened_sweep_joins_the_values_in_order():
  base = _sweep_run([0.1, 1.0], [0.5, 0.8])
  assert base.optimizers["adam"].at_sweep_edge
  more = _sweep_run([10.0, 0.01], [0.6, 0.2])
  merged = pipeline.merge_runs(base, more)
  r = merged.optimizers["adam"]
  assert r.values == [0.01, 0.1, 1.0, 10.0]
  assert r.curves[0].test_accuracy[-1] == [0.2, 0.5, 0.8, 0.6]
  assert r.curves[0].per_step["dt"] == [[1, 0, 1, 0]]
  assert r.best_value == 1.0 and not r.at_sweep_edge
  assert r.extended_by == [1] and len(merged.environments) == 2
  assert r.wall_s == 4.0
  with pytest.raises(ValueError, match="both runs trained"):
    pipeline.merge_runs(merged, more)


def test_summary_rows_say_how_each_value_was_tuned_and_compare_to_adam():
  sweep = _sweep_run([0.1, 1.0, 10.0], [0.5, 0.8, 0.6])
  longer = lambda run: dataclasses.replace(run, task=dataclasses.replace(
      run.task, num_steps=run.task.num_steps * 5))
  picked = longer(_sweep_run([1.0], [0.9]))  # Adam at the sweep's pick
  other = longer(_sweep_run([1.0], [0.93], name="soaa"))
  near = longer(_sweep_run([1.003], [0.85]))  # a factor typed 3 digits
  rows = summary.rows({"sweep": sweep, "pick": picked, "other": other})
  assert [(r.optimizer, r.run) for r in rows] == [("soaa", "other"),
                                                  ("adam", "pick")]
  assert rows[1].tuning == "pick of `sweep`"
  assert rows[0].tuning == "fixed value"
  (row,) = summary.rows({"sweep": sweep, "near": near})
  assert row.tuning == "pick of `sweep` (within 0.3 %)"
  far = longer(_sweep_run([1.05], [0.85]))
  assert summary.rows({"sweep": sweep, "far": far})[0].tuning == "fixed value"
  assert rows[0].delta == pytest.approx(0.03)
  table = summary.summary_table({"sweep": sweep, "pick": picked})
  assert "| (reference) |" in table and "`pick`" in table
  assert np.isclose(rows[1].mean, 0.9)


def test_merge_command_joins_the_files_and_keeps_a_provenance_note(tmp_path):
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from optax_soaa import bench  # pylint: disable=g-import-not-at-top
  paths = []
  for i, (values, scores) in enumerate((([0.1, 1.0], [0.5, 0.8]),
                                        ([10.0], [0.6]))):
    paths.append(tmp_path / f"r{i}.json")
    schema.save(paths[-1], _sweep_run(values, scores))
  out = tmp_path / "joined"
  with contextlib.redirect_stdout(io.StringIO()):
    assert bench.main(["--from-results", *map(str, paths), "--merge",
                       str(out), "--provenance", "ran on a busy machine"]) == 0
  joined = schema.load(out / schema.RESULTS_FILE)
  assert joined.optimizers["adam"].values == [0.1, 1.0, 10.0]
  assert joined.provenance_notes == ["ran on a busy machine"]
  text = (out / "results.md").read_text()
  assert "- Provenance: ran on a busy machine" in text
  assert "- values added (joined by --merge): `" in text
