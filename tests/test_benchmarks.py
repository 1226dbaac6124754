"""The benchmark and evidence scripts end to end on tiny settings, so that their one-command
reproductions keep working (the real runs take minutes to an hour and are not part of CI)."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_loss  # noqa: E402
import bench_step  # noqa: E402
import evidence  # noqa: E402


@pytest.mark.slow
def test_bench_loss_agrees_with_its_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_loss, "SHAPES", [(3, 2, 5, 7)])
    monkeypatch.setattr(bench_loss, "SWEEP_SIDES", [4])
    bench_loss.main(["--repeats", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "bench_loss_cpu.json").read_text())
    rows = results["shapes"] + results["sweep"]
    assert [(row["shape"], row["scores"]) for row in rows] == [
        ([3, 2, 5, 7], "noise"), ([3, 2, 5, 7], "smooth"), ([16, 6, 4, 4], "noise"), ([16, 6, 4, 4], "smooth"),
    ]  # fmt: skip
    assert all(row["loss_rel_diff"] < 1e-5 and row["speedup"] > 0 for row in rows)
    assert "| 3×2, 5×7 | noise |" in (tmp_path / "bench_loss_cpu.md").read_text()


@pytest.mark.slow
def test_bench_step_reports_time_and_memory_ratios(tmp_path):
    tiny = ["--small-image", "16", "--small-hidden", "32", "--small-layers", "2", "--small-intermediate", "37"]
    stem = tmp_path / "bench_step"
    bench_step.main(["--model", "small", "--repeats", "1", "--warmup", "0", "--small-batch", "4", *tiny,
                     "--output", str(stem)])  # fmt: skip
    report = json.loads(stem.with_suffix(".json").read_text())
    variants = report["results"]["small"]["variants"]
    assert set(variants) == {"plain", "sar-fast", "generic"}
    for summary in variants.values():
        assert summary["time_ratio"] > 0 and summary["peak_ratio"] > 0
    assert variants["plain"]["time_ratio"] == 1 and variants["plain"]["peak_ratio"] == 1


@pytest.mark.slow
def test_evidence_study_and_report(tmp_path):
    out = tmp_path / "evidence"
    study = ["--seeds", "0", "--fractions", "0.1", "--max_steps", "2", "--variants", "baseline", "sar-0.01",
             "--output", str(out)]  # fmt: skip
    evidence.main(study)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(run["variant"] for run in runs) == ["baseline", "sar-0.01"]
    for run in runs:
        assert 0 <= run["test_accuracy"] <= 1 and 0 <= run["test_jaccard"] <= 1 and run["test_entropy"] >= 0
    report = (out / "README.md").read_text()
    assert "| train fraction | baseline | sar-0.01 |" in report
    assert (out / "evidence.png").is_file() and (out / "attention_maps.png").is_file()
    # A second invocation finds every run done and only rebuilds the report.
    evidence.main(study)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2
