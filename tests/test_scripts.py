"""The scripts on real redis-servers: the operator scripts of issue 4 (cron GC) and the latency A/B benchmark;
scripts/acl.py is tested in test_security.py."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from test_ops import publish_versions

from redisbus.ops import BusAdmin

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["gc_cron", "latency_ab"])
def test_each_script_has_a_usage_line(name, capsys):
    module = load(name)
    assert module.__doc__.split("\n\n")[1].startswith(f"usage: {name}.py")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and f"usage: {name}.py" in capsys.readouterr().out


# --------------------------------------------------------------------------- gc_cron.py


def test_gc_cron_collects_every_namespace_quietly_and_keeps_latest_and_pin(redis_server, tmp_path):
    url = redis_server.url
    publish_versions(url, 4, namespace="a")
    publish_versions(url, 3, namespace="b")
    with BusAdmin(url, namespace="a") as admin:
        admin.pin(2)
    lock = tmp_path / "gc.lock"
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "gc_cron.py"), "--keep", "1", "--grace", "0", "--lock", str(lock), "a", "b"],
        check=False, capture_output=True, text=True, env={"REDISBUS_URL": url, "PATH": ""}, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # cron mails nothing when all went well
    with BusAdmin(url, namespace="a") as a, BusAdmin(url, namespace="b") as b:
        assert a.committed() == [2, 4] and b.committed() == [3]
        assert all(r.ok for r in a.verify()) and all(r.ok for r in b.verify())


def test_gc_cron_verbose_dry_run_lock_and_failures(redis_server, redis_server_factory, tmp_path, capsys, free_port):
    gc_cron = load("gc_cron")
    url = redis_server.url
    publish_versions(url, 3, namespace="a")
    lock = str(tmp_path / "gc.lock")
    assert gc_cron.main(["--url", url, "--keep", "1", "--dry-run", "-v", "--lock", lock, "a"]) == 0
    line = capsys.readouterr().out.strip()
    assert "redisbus-gc ns=a keep=1 kept=3 would_evict=1,2 orphan_chunks=0" in line and "\n" not in line
    with BusAdmin(url, namespace="a") as admin:
        assert admin.committed() == [1, 2, 3]
    # an unknown namespace fails (3) but does not stop the others
    assert gc_cron.main(["--url", url, "--keep", "1", "--grace", "0", "-v", "--lock", lock, "nope", "a"]) == 3
    out = capsys.readouterr()
    assert "ns=nope error (exit 3)" in out.err and "ns=a keep=1 kept=3 evicted=1,2" in out.out
    # overlapping runs: the second one does nothing
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert gc_cron.main(["--url", url, "--lock", lock, "a"]) == gc_cron.EXIT_LOCKED
    assert "another run holds" in capsys.readouterr().err
    # unreachable, wrong password, malformed URL: one line each, never the password
    guarded = redis_server_factory(password="other")
    for bad, code in ((f"redis://:secret@127.0.0.1:{free_port}/0", 4), (f"redis://:secret@127.0.0.1:{guarded.port}/0", 4),
                      ("redis://:secret/0", 2)):
        assert gc_cron.main(["--url", bad, "--lock", lock, "a"]) == code
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1 and "secret" not in out.err
    with pytest.raises(SystemExit):
        gc_cron.main(["--keep", "0", "a"])


# --------------------------------------------------------------------------- latency_ab.py


def test_latency_ab_measures_two_trees_in_one_run(tmp_path):
    tree = str(SCRIPTS.parent)
    out = tmp_path / "ab.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "latency_ab.py"), "--subscribers", "2", "--rounds", "2", "--burst", "5",
         "--json", str(out), f"before={tree}", f"after={tree}"],
        check=False, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert set(figures) == {"before", "after"}
    for name, r in figures.items():
        assert r["expected"] == 2 * 5 * 2 and r["samples"] == r["expected"]  # every worker applied every version
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["subscriber_cpu_ms"] > 0 and r["publisher_cpu_ms"] > 0
        assert f"{name}: 2 x 100K MLP  p50 {r['p50_ms']:.2f}" in done.stdout


def test_latency_ab_refuses_a_folder_without_redisbus(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "latency_ab.py"), f"a={tmp_path}", f"b={SCRIPTS.parent}"],
                          check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "expected NAME=TREE, TREE a folder holding redisbus/" in done.stderr
