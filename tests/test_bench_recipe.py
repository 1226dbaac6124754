"""benchmarks/bench_recipe.py end to end on a tiny setting, so that its one-command measurement keeps working."""

import json

import pytest

from benchmarks import bench_recipe


@pytest.mark.slow
def test_bench_recipe_times_both_runs_and_reports_the_ratio(tmp_path):
    tiny = ["--model_preset", "tiny", "--max_train_samples", "32", "--max_eval_samples", "16", "--num_train_epochs",
            "1", "--per_device_train_batch_size", "16", "--attention_figure_images", "0"]  # fmt: skip
    stem = tmp_path / "bench_recipe"
    bench_recipe.main(["--device", "cpu", "--pairs", "1", "--component_rounds", "2", "--output", str(stem), "--",
                       *tiny])  # fmt: skip
    report = json.loads(stem.with_suffix(".json").read_text())
    assert [run["variant"] for run in report["runs"]] == ["plain", "recipe"]
    assert all(run["wall_seconds"] > run["train_seconds"] > 0 and run["cpu_seconds"] > 0 for run in report["runs"])
    summary, (plain, recipe) = report["summary"], report["runs"]
    assert summary["wall_ratio"] == pytest.approx(recipe["wall_seconds"] / plain["wall_seconds"])
    assert 0 <= summary["recipe"]["test_accuracy"][0] <= 1
    components = report["components"]
    assert set(components["median_ms"]) == {"plain transform", "recipe transform", "mixup/cutmix", "training step"}
    assert all(ms > 0 for ms in components["median_ms"].values()) and components["estimated_ratio"] > 0
    assert "| recipe |" in stem.with_suffix(".md").read_text()
