"""The update-step benchmark runs end to end on a tiny pytree."""

from optax_soaa.benchmarks import update_step


def test_quick_run_writes_report(tmp_path):
  out = tmp_path / "update_step.md"
  results = update_step.main([
      "--num-params", "20000", "--pairs", "2", "--steps-per-timing", "1",
      "--optimizers", "adam", "soaa-second_moment", "soaa-second_moment-xla",
      "--markdown", str(out), "--json", str(tmp_path / "r.json")])
  assert results["adam"]["time_ratio_vs_adam"] == 1.0
  ratio = results["soaa-second_moment"]["time_ratio_vs_adam"]
  assert 0 < ratio < 100
  assert abs(results["soaa-second_moment"]["state_ratio_vs_adam"] - 1.0) < 0.01
  text = out.read_text()
  assert "python -m optax_soaa.benchmarks.update_step" in text
  assert "| soaa-second_moment |" in text
  assert "| soaa-second_moment-xla |" in text
  assert "fused CPU kernels" in text
  assert (tmp_path / "r.json").exists()
