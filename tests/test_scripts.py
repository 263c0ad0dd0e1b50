"""The operator scripts of issue 4 (cron GC, per-namespace ACL users with an ops user), on real redis-servers."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis
import torch
from click.testing import CliRunner
from test_ops import publish_versions

from redisbus import WeightPublisher, WeightSubscriber
from redisbus.cli import cli
from redisbus.ops import BusAdmin

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["gc_cron", "acl_setup"])
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


# --------------------------------------------------------------------------- acl_setup.py

PASSWORDS = {
    "REDISBUS_PUBLISHER_PASSWORD": "pub-pass-1",
    "REDISBUS_WORKER_PASSWORD": "work-pass-2",
    "REDISBUS_OPS_PASSWORD": "ops-pass-3",
}


def test_acl_setup_prints_rules_without_passwords(monkeypatch, capsys):
    acl = load("acl_setup")
    for name in PASSWORDS:
        monkeypatch.delenv(name, raising=False)
    assert acl.main(["ppo"]) == 2
    assert "REDISBUS_WORKER_PASSWORD" in capsys.readouterr().err
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    assert acl.main(["ppo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["rb-ppo-publisher", "rb-ppo-worker", "rb-ppo-ops"]
    worker = lines[1].split()
    assert "%R~rb:{ppo}:*" in worker and "%RW~rb:{ppo}:workers" in worker and "&rb:{ppo}:notify" in worker
    assert "+set" not in worker and "+eval" not in worker
    assert all(value not in "\n".join(lines) for value in PASSWORDS.values())
    assert acl.main(["ppo", "--format", "aclfile", "--redis6"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("user rb-ppo-publisher ") and "%R~" not in text
    assert acl.main(["bad ns"]) == 2


def test_acl_users_let_each_role_do_its_job_and_no_more(redis_server_factory, monkeypatch, capsys):
    acl = load("acl_setup")
    server = redis_server_factory(password="admin-pass")
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    assert acl.main(["--url", server.url, "--apply", "ppo"]) == 0
    assert capsys.readouterr().out.count("ACL user rb-ppo-") == 3
    base = f"127.0.0.1:{server.port}/0"
    publisher_url = f"redis://rb-ppo-publisher:pub-pass-1@{base}"
    worker_url = f"redis://rb-ppo-worker:work-pass-2@{base}"
    ops_url = f"redis://rb-ppo-ops:ops-pass-3@{base}"
    module = torch.nn.Linear(600, 1, bias=False)
    with WeightPublisher(publisher_url, namespace="ppo", chunk_size=1024, keep_versions=2) as pub:
        pub.publish({"weight": torch.ones(1, 600)})
        with WeightSubscriber(worker_url, namespace="ppo", target=module, worker_id="w-1", apply="immediate",
                              heartbeat_interval=0.2) as sub:
            sub.start()
            assert sub.wait_for_version(1, timeout=10) == 1
            pub.publish({"weight": torch.full((1, 600), 2.0)})
            pub.publish({"weight": torch.full((1, 600), 3.0)})  # the publisher's own GC runs too
            assert sub.wait_for_version(3, timeout=10) == 3
            assert torch.equal(module.weight, torch.full((1, 600), 3.0))
            assert sub.stats()["errors"] == 0
    worker = redis.Redis.from_url(worker_url)
    for command in (("SET", "rb:{ppo}:latest", "9"), ("DEL", "rb:chunk:{ppo:3:0}"), ("PUBLISH", "rb:{ppo}:notify", "x"),
                    ("HSET", "rb:{ppo}:publishers", "x", "y"), ("GET", "rb:{other}:latest"), ("CONFIG", "GET", "requirepass")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*command)
    worker.close()
    env = {"REDISBUS_URL": ops_url, "REDISBUS_NAMESPACE": "ppo", "COLUMNS": "200"}
    runner = CliRunner()
    listed = runner.invoke(cli, ["versions", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert [v["version"] for v in json.loads(listed.stdout)] == [2, 3]
    for args in (["verify", "--all"], ["workers"], ["rollback", "2"], ["pin"], ["unpin"], ["gc", "--keep", "1"]):
        result = runner.invoke(cli, args, env=env)
        assert result.exit_code == 0, (args, result.output)
        assert "ops-pass-3" not in result.output
    denied = runner.invoke(cli, ["versions"], env={**env, "REDISBUS_NAMESPACE": "other"})
    assert denied.exit_code == 5, denied.output
    assert denied.stderr.startswith("Error: ") and "no permissions" in denied.stderr and denied.stderr.count("\n") == 1
