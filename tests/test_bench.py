"""``scripts/bench.py --quick --json FILE`` runs end to end and reports every contender with sane figures.

No speed target is asserted here (timings depend on the machine and its load);
only that every section ran and that every figure is a positive, finite number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
CONTENDERS = {"raw", "naive", "tensordict", "torchrl_shm", "torchrl_mp", "redisbus"}
TARGETS = {"pull", "publish", "naive", "tensordict", "latency_p50", "latency_p99", "fanout", "memory", "checksum"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _positive(value, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what} = {value!r}"


@pytest.fixture(scope="module")
def report(tmp_path_factory, redis_server_binary):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), "--redis-server", redis_server_binary],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_usage_line():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: bench.py")
    for option in ("--url", "--json", "--quick", "--sizes", "--repeats", "--cluster"):
        assert option in proc.stdout


def test_throughput_has_every_contender_with_positive_figures(report):
    data, _ = report
    assert data["throughput"], "no throughput section"
    for size, entry in data["throughput"].items():
        assert set(entry) == CONTENDERS, f"{size}: {sorted(entry)}"
        for name, e in entry.items():
            assert "error" not in e, f"{name} at {size} could not run: {e.get('error')}"
            _positive(e["roundtrip_gbps"], f"{name} round trip")
            if not name.startswith("torchrl"):  # TorchRL's schemes have one figure: send until acknowledged
                _positive(e["publish_gbps"], f"{name} publish")
                _positive(e["pull_gbps"], f"{name} pull")
        _positive(entry["redisbus"]["blocked_ms"], "redisbus publish(block=False) blocked time")
        ratios = data["ratios"][size]
        assert set(ratios) == CONTENDERS - {"redisbus"}
        for name, r in ratios.items():
            _positive(r["roundtrip"], f"redisbus / {name} round trip")


def test_latency_fanout_memory_checksum_sections(report):
    data, _ = report
    lat = data["latency"]
    assert {k.split("/")[1] for k in lat} == {"immediate", "on_sync"}
    for key, e in lat.items():
        assert e["workers_reporting"] == e["subscribers"], key
        _positive(e["p50_ms"], f"{key} p50")
        assert e["p99_ms"] >= e["p50_ms"]
    fan = data["fanout"]
    _positive(fan["redisbus_gbps"], "fan-out redisbus")
    _positive(fan["raw_gbps"], "fan-out raw")
    mem = data["memory"]
    if "error" not in mem:  # needs Linux /proc
        for role in ("worker", "publisher"):
            _positive(mem[role]["peak_extra_bytes"], f"{role} peak extra RSS")
            assert len(mem[role]["rss_extra_bytes"]) == mem["versions"]
    cs = data["checksum"]
    _positive(cs["xxh3_gbps"], "xxh3")
    _positive(cs["pull_without_verify_s"], "pull without verify")


def test_targets_and_table(report):
    data, stdout = report
    assert {row["target"] for row in data["targets"]} == TARGETS
    assert all(row["pass"] in (True, False, None) for row in data["targets"])
    assert data["machine"]["cpus"] and data["redis_version"]
    for heading in ("Throughput:", "Small-policy latency", "Fan-out:", "Memory:", "Checksum:", "Targets (issue 5)"):
        assert heading in stdout
    for label in ("raw RESP socket", "naive torch.save", "TensorDictStore", "SharedMemWeightSyncScheme", "redisbus"):
        assert label in stdout
