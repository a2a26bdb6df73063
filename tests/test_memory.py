"""The memory estimate made before any work is an upper bound of the measured peak.

Each case runs in a fresh process (tests/memory_probe.py) on a 4-layer d256 Llama with a
160-token prompt; the peak is the resident-memory high-water mark above the level before
the request, with glibc returning every freed buffer of 64 KiB or more to the system.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak"
)


def _probe(fields: dict[str, object], budget: str, family: str = "llama") -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(fields), budget, family],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "fields",
    [
        {"granularity": "token", "outputs": ["states"]},
        {"granularity": "token", "all_layers": True, "outputs": ["states", "scores"]},
        {"granularity": "head", "start_layer": [0, 1, 2, 3], "outputs": ["states", "scores"]},
        {"granularity": "neuron", "start_layer": 1},
    ],
    ids=["token", "all-layers", "heads", "neurons"],
)
@pytest.mark.parametrize("budget", ["4294967296", "smallest"], ids=["roomy", "smallest"])
def test_estimate_bounds_measured_peak(fields: dict[str, object], budget: str) -> None:
    """Roomy: chunks as large as the policy allows; smallest: the least budget that takes
    the request (one row per attention block, one position per MLP chunk), whose peak
    must stay under that budget."""
    measured = _probe(fields, budget)
    print(f"{fields} budget={budget}: {measured}")
    assert measured["error"] <= 1e-5
    assert measured["peak"] <= measured["estimate"] <= measured["budget"]
    # and a bound that says something: within a small factor of the truth
    assert measured["estimate"] <= 4 * measured["peak"]


@pytest.mark.parametrize(
    "fields",
    [{"granularity": "token", "outputs": ["states"]}, {"granularity": "neuron", "start_layer": 1}],
    ids=["token", "neurons"],
)
@pytest.mark.parametrize("budget", ["4294967296", "smallest"], ids=["roomy", "smallest"])
def test_estimate_bounds_a_mixtures_measured_peak(fields: dict[str, object], budget: str) -> None:
    """The same bound on a Mixtral (four experts, two chosen): the estimate follows the
    mixture part (its neuron axis, its trace of the chosen experts only, and the experts'
    outputs an MLP chunk holds)."""
    measured = _probe(fields, budget, "mixtral")
    print(f"mixtral {fields} budget={budget}: {measured}")
    assert measured["error"] <= 1e-5
    assert measured["peak"] <= measured["estimate"] <= measured["budget"]
    assert measured["estimate"] <= 4 * measured["peak"]


@pytest.mark.parametrize(
    "fields",
    [
        {"positions": [-1]},
        {"positions": [-1, 50, 100], "targets": [5, 9]},
        {"granularity": "head", "start_layer": [0, 1, 2, 3], "positions": [-1]},
        {"granularity": "neuron", "start_layer": [0, 1, 2, 3], "positions": [-1]},
    ],
    ids=["token", "token-positions-targets", "heads", "neurons"],
)
def test_estimate_bounds_a_reverse_runs_measured_peak(fields: dict[str, object]) -> None:
    """The reverse strategy's estimate (engine.memory.reverse_estimate): the trace, the
    pass's saved activations and the kept gradients bound the measured peak."""
    reverse = {"mlp_split": "taylor", "strategy": "reverse", **fields}
    measured = _probe(reverse, "4294967296")
    print(f"reverse {fields}: {measured}")
    assert measured["error"] <= 1e-5
    assert measured["peak"] <= measured["estimate"] <= measured["budget"]
    assert measured["estimate"] <= 4 * measured["peak"]
