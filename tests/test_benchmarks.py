"""The benchmark command runs end to end (small shape) and its two implementations agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> list[dict]:
    """Run ``benchmarks/<script>`` with ``args``; its JSON lines."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return [json.loads(line) for line in completed.stdout.strip().splitlines()]


def test_cpu_bench_small_shape_runs_and_agrees() -> None:
    lines = bench("cpu_bench.py", "--shape", "small", "--repeats", "1")
    by_impl = {line.get("impl"): line for line in lines if "impl" in line}
    assert set(by_impl) == {
        "naive",
        "engine",
        "engine-compiled",
        "engine-last",
        "engine-last-compiled",
    }
    for line in by_impl.values():
        assert line["seconds"] > 0 and line["peak_rss_mib"] > 0
    summary = lines[-1]
    assert summary["summary"] == "engine vs naive"
    assert summary["speedup"] > 0 and set(summary["speedups"]) == set(by_impl) - {"naive"}
    assert summary["max_rel_diff"] <= 1e-4
    assert summary["last_position_max_abs_diff"] <= 1e-5


def test_gpu_bench_small_shape_runs_on_cpu() -> None:
    lines = bench("gpu_bench.py", "--shape", "small", "--device", "cpu", "--repeats", "1")
    assert [line["workload"] for line in lines] == [
        "token-32",
        "heads-32",
        "neurons-8",
        "batch-16x8",
        "reverse-token-32",
        "reverse-heads-32",
        "reverse-neurons-8",
    ]
    for line in lines:
        assert "error" not in line and "refused" not in line, line
        assert line["seconds"] > 0 and line["flop_limit_s"] > 0 and line["flop_limit_ratio"] > 0
        assert line["relative_conservation_error"] <= 1e-5
        assert line["estimate_gib"] <= line["budget_gib"]
        for key in ("n", "peak_gib", "device", "dtype", "matmul_dtype", "within_budget"):
            assert key in line
    assert {line["strategy"] for line in lines[4:]} == {"reverse"}
    batch = lines[3]
    assert batch["max_abs_diff"] <= 1e-5 and batch["batch_size"] > 1


def test_gpu_bench_reports_a_refusal_without_running() -> None:
    """A budget too small for the workload prints the engine's 413-style refusal."""
    lines = bench(
        "gpu_bench.py",
        "--shape",
        "small",
        "--device",
        "cpu",
        "--workloads",
        "token-32",
        "--budget-gib",
        "0.0001",
    )
    (line,) = lines
    assert "needs an estimated" in line["refused"] and "seconds" not in line


def test_peers_cost_runs_on_the_embedded_model(tmp_path: Path) -> None:
    """AttnLRP (the peer's own environment) and reverse mode, timed in one run: every
    method's runs, its ratio to a plain forward pass, the memory and the side facts."""
    import os

    import pytest

    from depass_eval.peers import PEERS

    why = PEERS["attnlrp"].missing()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI builds the peers first (make peers): {why}")
    if why:
        pytest.skip(why)
    out = tmp_path / "peers-cost.json"
    tiny = str(REPO / "models" / "depass-tiny")
    args = ["--model", tiny, "--sizes", "16,32", "--forward-sizes", "16", "--repeats", "1"]
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peers_cost.py"), *args, "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    saved = json.loads(out.read_text())
    rows = {row["tokens"]: row for row in saved["rows"]}
    assert set(rows) == {16, 32} and "forward_s" in rows[16] and "forward_s" not in rows[32]
    for size, row in rows.items():
        for method in ("plain", "attnlrp", "reverse", "peer-plain"):
            assert len(row[f"{method}_runs_s"]) == 1 and row[f"{method}_s"] > 0
            assert row[f"{method}_peak_above_model_mib"] >= 0
        assert row["attnlrp_over_reverse"] == row["attnlrp_s"] / row["reverse_s"]
        assert 0 <= row["top1_attnlrp"] < size - 1 and 0 <= row["top1_reverse"] < size - 1
        assert -1 <= row["spearman_attnlrp_reverse"] <= 1
    assert -1 <= rows[16]["spearman_reverse_forward"] <= 1
