"""The update-step benchmark runs end to end on a tiny pytree."""

import json

import jax

from optax_soaa.benchmarks import update_step


def test_quick_run_writes_report(tmp_path):
  out = tmp_path / "update_step.md"
  results = update_step.main([
      "--num-params", "20000", "--pairs", "2", "--steps-per-timing", "1",
      "--repeats", "2", "--optimizers", "adam", "soaa", "soaa-variance",
      "soaa-whole",
      "--markdown", str(out), "--json", str(tmp_path / "r.json")])
  assert results["adam"]["time_ratio_vs_adam"] == 1.0
  soaa = results["soaa"]
  assert 0 < soaa["time_ratio_vs_adam"] < 100
  assert len(soaa["time_ratio_per_repeat"]) == 2
  assert len(results["load_average_1min"]) == 2
  assert abs(soaa["state_ratio_vs_adam"] - 1.0) < 0.01
  # Bytes accessed: Adam reads and writes at least its 7 arrays; SOAA's two
  # passes move more than Adam's one, and both layouts count alike (the
  # whole-array step is the one analysed).
  assert results["adam"]["arrays_accessed"] >= 7
  assert soaa["arrays_accessed"] > results["adam"]["arrays_accessed"]
  assert soaa["arrays_accessed"] == results["soaa-whole"]["arrays_accessed"]
  assert soaa["floor_ratio_vs_adam"] == 9 / 7
  assert soaa["bytes_ratio_vs_floor"] == soaa["arrays_accessed"] / 9
  assert 0 < soaa["cpu_time_ratio_vs_adam"] < 100
  assert results["soaa-whole"]["layout"] == "whole"
  assert results["soaa-whole"]["longest_loop_body"] == 0
  if jax.default_backend() == "cpu" and jax.device_count() == 1:
    # "auto" runs slices here, and SOAA's loop bodies are short enough for
    # XLA:CPU to run inline (at most 8 operations).
    assert soaa["layout"] == "sliced"
    assert 0 < soaa["longest_loop_body"] <= 8
    assert 0 < results["soaa-variance"]["longest_loop_body"] <= 8
  text = out.read_text()
  assert "python -m optax_soaa.benchmarks.update_step" in text
  assert "| soaa |" in text and "| soaa-whole |" in text
  assert "bytes accessed" in text and "load average" in text
  assert "CPU time / Adam" in text and "longest loop body" in text
  assert json.loads((tmp_path / "r.json").read_text())["results"]["soaa"]
