"""The ``redisbus`` command, driven through click's runner and as a real console script, on real redis-servers."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import bit_identical, wait_until
from test_ops import CHUNK, make_policy, publish_versions, zeros_like_policy

from redisbus import WeightSubscriber
from redisbus._format import describe_event
from redisbus.cli import cli
from redisbus.exit_codes import EXIT_CODES
from redisbus.keys import KeySpace
from redisbus.registry import WorkerReport, report_worker

NS = "cli"


def run(url: str | None, *args: str, namespace: str | None = NS) -> Result:
    env = {"REDISBUS_URL": url, "REDISBUS_NAMESPACE": namespace, "COLUMNS": "200", "REDISBUS_SIGNING_KEY": None}
    result = CliRunner().invoke(cli, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback would have reached the user
    return result


def fails(result: Result, code: int, *needles: str) -> str:
    """Assert a one-line error on stderr, nothing like a traceback, and exit status ``code``."""
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def worker(url):
    target = zeros_like_policy()
    sub = WeightSubscriber(url, namespace=NS, target=target, worker_id="worker-a", apply="immediate",
                           poll_interval=0.2, heartbeat_interval=0.2)
    yield sub, target
    sub.close()


def test_version_help_and_exit_codes_are_documented():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == "redisbus, version 0.1.0"
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("versions", "inspect", "verify", "diff", "workers", "watch", "rollback", "pin", "unpin", "gc",
                    "export", "import", "status", "demo"):
        assert f"  {command} " in result.output
    text = " ".join(result.output.split())
    assert "REDISBUS_URL" in text and "REDISBUS_NAMESPACE" in text
    for code in EXIT_CODES:
        assert f"{code} " in text
    result = CliRunner().invoke(cli, ["import", "--help"])
    assert "weights_only=True" in " ".join(result.output.split())


def test_versions_table_and_json(url, redis_server):
    publish_versions(url, 3, namespace=NS)
    redis_server.client().delete(KeySpace(NS).chunk(1, 0))
    assert run(url, "pin", "2").exit_code == 0
    result = run(url, "versions")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert set(lines) == {"1", "2", "3"}
    assert "latest" in lines["3"] and "pinned" in lines["2"] and "INCOMPLETE" in lines["1"]
    assert "trainer-0" in lines["3"] and '{"step": 3}' in lines["3"] and "KiB" in lines["3"]
    assert f"namespace '{NS}'" in result.stdout and redis_server.url.split("//")[1].split("/")[0] in result.stdout
    data = json.loads(run(url, "versions", "--json").stdout)
    assert [v["version"] for v in data] == [1, 2, 3]
    assert data[2]["latest"] and data[1]["pinned"] and not data[0]["complete"] and data[2]["complete"]
    assert data[2]["metadata"] == {"step": 3} and data[2]["tensor_count"] == 9 and data[2]["chunk_count"] > 1
    assert all(line == line.rstrip() for line in result.stdout.splitlines())


def test_inspect_table_json_and_stats(url):
    with_nan = make_policy(1)
    with_nan["big"][0, 0] = float("nan")
    from redisbus import WeightPublisher

    with WeightPublisher(url, namespace=NS, chunk_size=CHUNK) as pub:
        pub.publish(with_nan, metadata={"step": 42})
    result = run(url, "inspect")
    assert result.exit_code == 0
    assert "version    1  (latest)" in result.stdout and '{"step": 42}' in result.stdout
    big = next(line for line in result.stdout.splitlines() if line.startswith("big "))
    assert "float32" in big and "(40, 32)" in big and "5.0 KiB" in big
    stats = run(url, "inspect", "latest", "--stats")
    big = next(line for line in stats.stdout.splitlines() if line.startswith("big "))
    assert big.split()[-2:] == ["1", "0"]  # nan, inf
    data = json.loads(run(url, "inspect", "1", "--stats", "--json").stdout)
    rows = {t["key"]: t for t in data["tensors"]}
    finite = with_nan["big"].reshape(-1)[1:]
    assert rows["big"]["stats"]["nan"] == 1 and rows["big"]["stats"]["max"] == pytest.approx(float(finite.max()))
    assert rows["actor.w"]["shape"] == [16, 8] and data["metadata"] == {"step": 42}
    shown = run(url, "--progress", "always", "inspect", "--stats")
    assert shown.exit_code == 0 and "reading v1" in shown.stderr


def test_verify_passes_then_fails_naming_the_corrupted_chunk(url, redis_server):
    publish_versions(url, 2, namespace=NS)
    ok = run(url, "verify", "--all")
    assert ok.exit_code == 0 and "v1: OK" in ok.stdout and "v2: OK" in ok.stdout and not ok.stderr
    key = KeySpace(NS).chunk(2, 0)
    redis_server.client().setrange(key, 0, b"X")
    bad = run(url, "verify")
    fails(bad, 1, "verification failed", "v2: bad chunks 0")
    assert "v2: FAILED" in bad.stdout and f"chunk 0 ({key}): checksum" in bad.stdout
    data = json.loads(run(url, "verify", "--all", "--json").stdout)
    assert data["ok"] is False and [v["ok"] for v in data["versions"]] == [True, False]
    assert data["versions"][1]["bad_chunks"] == [0] and data["versions"][1]["problems"][0]["key"] == key
    assert run(url, "verify", "1").exit_code == 0
    fails(run(url, "inspect", "2", "--stats"), 1, "chunk 0")
    assert run(url, "verify", "1", "--all").exit_code == 2


def test_diff_human_json_and_exit_code(url):
    publish_versions(url, 2, namespace=NS)
    result = run(url, "diff", "1", "2")
    assert result.exit_code == 0
    assert result.stdout.startswith("v1 -> v2: ") and "0 added, 0 removed" in result.stdout
    big = next(line for line in result.stdout.splitlines() if line.startswith("big "))
    assert "changed" in big and "1280" in big  # every element of the 40x32 matrix
    data = json.loads(run(url, "diff", "1", "--json").stdout)
    assert data["old"] == 1 and data["new"] == 2 and not data["identical"]
    assert {t["key"]: t["change"] for t in data["tensors"]}["empty"] == "unchanged"
    assert run(url, "diff", "1", "2", "--exit-code").exit_code == 1
    assert run(url, "diff", "2", "2", "--exit-code").exit_code == 0


def test_workers_shows_lag_and_marks_dead_workers(url, redis_server, worker):
    publish_versions(url, 3, namespace=NS)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(3, timeout=10)
    keys = KeySpace(NS)
    report_worker(redis_server.client(), keys, WorkerReport("ghost-7", 1, time.time() - 300, time.time() - 200, "deadhost", 99))
    assert wait_until(lambda: '"version": 3' in run(url, "workers", "--json").stdout, timeout=5)
    result = run(url, "workers")
    assert result.exit_code == 0 and "latest v3" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("worker-a", "ghost-7"))}
    assert rows["ghost-7"][1:5] == ["deadhost", "99", "1", "2"] and rows["ghost-7"][-1] == "DEAD"
    assert rows["worker-a"][3:5] == ["3", "0"] and rows["worker-a"][-1] == "current"
    data = json.loads(run(url, "workers", "--json").stdout)
    by = {w["worker_id"]: w for w in data["workers"]}
    assert by["ghost-7"]["dead"] and by["ghost-7"]["lag"] == 2 and by["ghost-7"]["heartbeat_age"] > 150
    assert not by["worker-a"]["dead"] and by["worker-a"]["lag"] == 0
    pruned = run(url, "workers", "--prune")
    assert "pruned 1 dead worker(s): ghost-7" in pruned.stdout
    assert "ghost-7" not in run(url, "workers").stdout


def test_watch_prints_commits_and_applies(url, worker):
    publish_versions(url, 1, namespace=NS)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(1, timeout=10)
    assert wait_until(lambda: '"version": 1' in run(url, "workers", "--json").stdout, timeout=5)
    threading.Timer(0.4, lambda: publish_versions(url, 1, namespace=NS, start_seed=5)).start()
    result = run(url, "watch", "--count", "2", "--json", "--interval", "0.1", "--timeout", "15")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["version", "applied"]
    assert events[0]["version"] == 2 and events[0]["metadata"] == {"step": 5}
    assert (events[1]["worker"], events[1]["version"], events[1]["previous"]) == ("worker-a", 2, 1)
    threading.Timer(0.4, lambda: publish_versions(url, 1, namespace=NS, start_seed=6)).start()
    human = run(url, "watch", "--count", "2", "--interval", "0.1", "--timeout", "15")
    lines = human.stdout.splitlines()
    assert lines[0].startswith(f"watching namespace '{NS}'") and "latest v2" in lines[0]
    assert "v3 committed" in lines[1] and '{"step": 6}' in lines[1]
    assert "worker-a applied v3 (was v2)" in lines[2]
    quiet = run(url, "watch", "--timeout", "0.3")
    assert quiet.exit_code == 0 and len(quiet.stdout.splitlines()) == 1


def test_rollback_makes_a_running_worker_apply_old_weights_under_a_new_version(url, worker):
    published = publish_versions(url, 3, namespace=NS)
    sub, target = worker
    sub.start()
    assert sub.wait_for_version(3, timeout=10) == 3
    result = run(url, "rollback", "1")
    assert result.exit_code == 0, result.output
    assert "the weights of v1 are now v4" in result.stdout and not result.stderr
    assert sub.wait_for_version(4, timeout=10) == 4
    assert bit_identical(target, published[1])
    for key, value in published[1].items(include_nested=True, leaves_only=True):
        assert torch.equal(target[key], value)
    data = json.loads(run(url, "inspect", "4", "--json").stdout)
    assert data["metadata"] == {"rollback_of": 1}
    assert json.loads(run(url, "rollback", "2", "--json", "-m", "reason=bad-run").stdout)["metadata"] == {
        "rollback_of": 2, "reason": "bad-run"}
    fails(run(url, "rollback", "17"), 3, "version 17 not found")


def test_rollback_waits_for_the_replicas_its_url_asks_for_whatever_redisbus_url_says(url, redis_server, free_port):
    def waits() -> int:
        return int(redis_server.client().info("commandstats").get("cmdstat_wait", {}).get("calls", 0))

    publish_versions(url, 3, namespace=NS)
    elsewhere = f"redis://127.0.0.1:{free_port}/0?wait_timeout=9"  # another server, other settings
    env = {"REDISBUS_URL": elsewhere, "REDISBUS_NAMESPACE": NS, "COLUMNS": "200", "REDISBUS_SIGNING_KEY": None}
    result = CliRunner().invoke(cli, ["--url", f"{url}?wait_replicas=1&wait_timeout=0.2", "rollback", "3", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == 4 and waits() == 1  # no replica: WAIT timed out, the commit went on
    assert run(url, "rollback", "2").exit_code == 0 and waits() == 1  # no wait_replicas: no WAIT


def test_pin_unpin_and_gc(url, worker):
    publish_versions(url, 4, namespace=NS)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(4, timeout=10)
    pinned = run(url, "pin", "2")
    assert pinned.exit_code == 0 and "pinned at v2" in pinned.stdout
    assert "worker-a" in pinned.stderr and "rollback 2" in pinned.stderr  # it is ahead and stays there
    rolled = run(url, "rollback", "3")
    assert "pinned at v2" in rolled.stderr and "unpin" in rolled.stderr
    dry = run(url, "gc", "--keep", "1", "--dry-run")
    assert dry.exit_code == 0 and "kept     v2, v5" in dry.stdout and "would evict v1, v3, v4" in dry.stdout
    assert "dry run: nothing changed" in dry.stdout
    assert [v["version"] for v in json.loads(run(url, "versions", "--json").stdout)] == [1, 2, 3, 4, 5]
    done = json.loads(run(url, "gc", "--keep", "1", "--grace", "0", "--json").stdout)
    assert done["kept"] == [2, 5] and done["evicted"] == [1, 3, 4] and done["pin"] == 2 and done["latest"] == 5
    assert [v["version"] for v in json.loads(run(url, "versions", "--json").stdout)] == [2, 5]
    assert run(url, "verify", "--all").exit_code == 0
    unpinned = run(url, "unpin")
    assert "unpinned (was v2); workers move on to v5" in unpinned.stdout
    assert sub.wait_for_version(5, timeout=10) == 5
    assert "no pin was set" in run(url, "unpin").stdout
    assert json.loads(run(url, "pin", "--json").stdout)["pin"] == 5
    assert run(url, "gc", "--keep", "0").exit_code == 2


def test_export_and_import(url, tmp_path):
    published = publish_versions(url, 2, namespace=NS)
    path = tmp_path / "v1.safetensors"
    result = run(url, "export", "1", str(path))
    assert result.exit_code == 0 and f"exported v1 to {path} (9 tensors" in result.stdout
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    for key, value in published[1].items(include_nested=True, leaves_only=True):
        assert torch.equal(loaded[".".join(key if isinstance(key, tuple) else (key,))], value)
    imported = run(url, "import", str(path), "-m", "source=test")
    assert imported.exit_code == 0 and "imported v1.safetensors as v3 (9 tensors" in imported.stdout
    data = json.loads(run(url, "inspect", "3", "--json").stdout)
    assert data["metadata"] == {"imported_from": "v1.safetensors", "source": "test"}
    assert json.loads(run(url, "diff", "1", "3", "--json").stdout)["identical"]
    torch.save({"sd": {"w": torch.ones(3)}}, tmp_path / "ck.pt")
    assert json.loads(run(url, "import", str(tmp_path / "ck.pt"), "--select", "sd", "--json").stdout)["version"] == 4
    fails(run(url, "import", str(tmp_path / "ck.pt"), "--select", "nope"), 2, "no entry 'nope'")
    (tmp_path / "x.txt").write_text("hello")
    fails(run(url, "import", str(tmp_path / "x.txt")), 2, "unknown file type")
    assert run(url, "import", str(tmp_path / "missing.safetensors")).exit_code == 2
    fails(run(url, "export", "1", str(tmp_path / "no" / "such" / "dir.safetensors")), 2, "cannot write")
    data = json.loads(run(url, "export", "latest", str(tmp_path / "last.safetensors"), "--json").stdout)
    assert data["version"] == 4 and data["tensor_count"] == 1


def test_status(url, worker):
    fails(run(url, "status"), 3, f"nothing found for namespace '{NS}'")
    publish_versions(url, 2, namespace=NS)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(2, timeout=10)
    assert wait_until(lambda: json.loads(run(url, "status", "--json").stdout)["workers_current"] == 1, timeout=5)
    text = run(url, "status").stdout
    assert "latest      v2" in text and "versions    2 kept (v1, v2)" in text and "1 current, 0 behind, 0 dead" in text
    assert "publisher   trainer-0  last v2" in text


def test_status_and_workers_show_a_worker_ahead_of_latest_as_ahead(url, redis_server):
    """After Redis restarted empty and the trainer numbered from 1 again, a worker still on v9 is not "current"."""
    publish_versions(url, 3, namespace=NS)
    keys, now = KeySpace(NS), time.time()
    report_worker(redis_server.client(), keys, WorkerReport("on-3", 3, now, now, "hosta", 1))
    report_worker(redis_server.client(), keys, WorkerReport("on-9", 9, now, now, "hostb", 2))
    text = run(url, "status")
    assert text.exit_code == 0 and "2 reporting: 1 current, 0 behind, 1 ahead of latest, 0 dead" in text.stdout
    assert "1 worker(s) run a version newer than latest v3" in text.stderr
    data = json.loads(run(url, "status", "--json").stdout)
    assert (data["workers"], data["workers_current"], data["workers_lagging"], data["workers_ahead"]) == (2, 1, 0, 1)
    table = run(url, "workers")
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.startswith("on-")}
    assert rows["on-9"][3:5] == ["9", "-6"] and rows["on-9"][-1] == "ahead"
    assert rows["on-3"][3:5] == ["3", "0"] and rows["on-3"][-1] == "current"
    assert "1 worker(s) run a version newer than latest v3" in table.stderr
    by = {w["worker_id"]: w for w in json.loads(run(url, "workers", "--json").stdout)["workers"]}
    assert (by["on-9"]["lag"], by["on-9"]["state"]) == (-6, "ahead") and (by["on-3"]["lag"], by["on-3"]["state"]) == (0, "current")
    applied = {"event": "applied", "time": time.time(), "worker": "on-9", "host": "hostb", "pid": 2, "version": 9, "previous": 8}
    assert describe_event({**applied, "lag": -6}).endswith("on-9 applied v9 (was v8, 6 ahead of latest)")
    assert describe_event({**applied, "lag": 2}).endswith("on-9 applied v9 (was v8, 2 behind)")
    assert describe_event({**applied, "lag": 0}).endswith("on-9 applied v9 (was v8)")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("inspect", "9"), 3, "version 9 not found"),
        (("verify", "9"), 3, "version 9 not found"),
        (("diff", "1", "9"), 3, "version 9 not found"),
        (("pin", "9"), 3, "version 9 not found"),
        (("export", "9", "x.safetensors"), 3, "version 9 not found"),
        (("-n", "elsewhere", "versions"), 3, "no versions in namespace 'elsewhere'"),
        (("-n", "elsewhere", "inspect"), 3, "no versions in namespace 'elsewhere'"),
        (("-n", "elsewhere", "workers"), 3, "nothing found for namespace 'elsewhere'"),
        (("-n", "bad name!", "versions"), 2, "invalid namespace"),
        (("inspect", "abc"), 2, "is not a version number"),
        (("inspect", "0"), 2, "versions start at 1"),
    ],
)
def test_bad_input_gives_one_line_and_a_documented_status(url, args, code, needle):
    publish_versions(url, 1, namespace=NS)
    result = run(url, *args)
    assert result.exit_code == code, result.output
    assert needle in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("bad_url", "code", "needle"),
    [
        ("redis://127.0.0.1:{free}/0", 4, "cannot reach Redis at 127.0.0.1:{free}"),
        ("http://127.0.0.1:{free}/0", 2, "invalid Redis URL scheme"),
        ("redis://127.0.0.1:notaport/0", 2, "invalid Redis URL"),
        ("redis://127.0.0.1:{free}/zero", 2, "invalid database number"),
    ],
)
def test_unreachable_or_malformed_url(free_port, bad_url, code, needle):
    result = run(bad_url.format(free=free_port), "versions")
    fails(result, code, needle.format(free=free_port))


def test_password_never_printed(redis_server_factory, free_port):
    good = redis_server_factory(password="secret")
    other = redis_server_factory(password="something-else")
    url = good.url
    assert ":secret@" in url
    publish_versions(url, 2, namespace=NS)
    outputs = []
    for args in (("versions",), ("versions", "--json"), ("status",), ("status", "--json"), ("workers",),
                 ("inspect", "--stats"), ("verify", "--all"), ("gc", "--dry-run"), ("watch", "--timeout", "0.2"),
                 ("inspect", "77"), ("-n", "nothing", "versions")):
        result = run(url, *args)
        assert result.exit_code in (0, 3), result.output
        outputs.append(result.output)
    assert "redis://:***@127.0.0.1" in outputs[0]
    wrong = f"redis://:secret@127.0.0.1:{other.port}/0"
    fails(run(wrong, "versions"), 4, "authentication to Redis at 127.0.0.1")
    fails(run(f"redis://127.0.0.1:{good.port}/0", "versions"), 4, "authentication")
    fails(run(f"redis://admin:secret@127.0.0.1:{good.port}/0", "versions"), 4, "authentication")
    outputs += [run(u, "versions").output for u in (wrong, "redis://:secret/0", "redis://:secret@127.0.0.1:x/0",
                                                    f"redis://:secret@127.0.0.1:{free_port}/0")]
    for text in outputs:
        assert "secret" not in text, text


def test_console_script_runs_as_a_real_process(url, free_port):
    script = shutil.which("redisbus") or str(Path(sys.executable).with_name("redisbus"))
    if not Path(script).exists():
        pytest.skip("the redisbus console script is not installed (pip install -e .)")
    publish_versions(url, 2, namespace=NS)
    env = {"PATH": str(Path(sys.executable).parent), "REDISBUS_NAMESPACE": NS}
    done = subprocess.run([script, "--url", url, "versions", "--json"], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [v["version"] for v in json.loads(done.stdout)] == [1, 2]
    done = subprocess.run([script, "-n", NS, "inspect", "9"], check=False, capture_output=True, text=True, timeout=60,
                          env={**env, "REDISBUS_URL": f"redis://127.0.0.1:{free_port}/0"})
    assert done.returncode == 4 and done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_demo_command_passes_its_options(url, monkeypatch):
    demo = pytest.importorskip("redisbus.demo")
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, out=None: calls.append(a) or 0)
    assert run(url, "demo", "--workers", "3", "--versions", "4", "--interval", "0.25", namespace=None).exit_code == 0
    assert calls[-1] == (url, 3, 4, 0.25, "demo")  # the default namespace is not the demo's
    assert run(url, "-n", "mine", "demo", namespace=None).exit_code == 0
    assert calls[-1] == (url, 2, 5, 0.5, "mine")
    monkeypatch.setattr(demo, "run_demo", lambda *a, out=None: 1)
    assert run(url, "demo").exit_code == 1


def test_demo_runs_a_trainer_and_a_worker_on_the_given_redis(url):
    pytest.importorskip("redisbus.demo")
    result = run(url, "demo", "--workers", "1", "--versions", "2", "--interval", "0.05", namespace=None)
    assert result.exit_code == 0, result.output
    assert "1/1 workers hold the trainer's exact weights of version 2" in result.stdout
    assert json.loads(run(url, "-n", "demo", "versions", "--json").stdout)[-1]["version"] == 2


def test_watch_stops_cleanly_on_ctrl_c(url):
    script = shutil.which("redisbus") or str(Path(sys.executable).with_name("redisbus"))
    if not Path(script).exists():
        pytest.skip("the redisbus console script is not installed (pip install -e .)")
    publish_versions(url, 1, namespace=NS)
    proc = subprocess.Popen([script, "--url", url, "-n", NS, "watch", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=60)
        assert first.startswith(f"watching namespace '{NS}'") and "latest v1" in first
        publish_versions(url, 1, namespace=NS, start_seed=3)
        assert "v2 committed" in lines.get(timeout=30)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == ""


def test_watch_piped_into_a_reader_that_stops_ends_quietly_with_0(url):
    """``redisbus watch | head -1``: once the reader is gone, the next line ends watch with status 0
    and nothing on stderr (not click's status 1, which here means "verification failed")."""
    script = shutil.which("redisbus") or str(Path(sys.executable).with_name("redisbus"))
    if not Path(script).exists():
        pytest.skip("the redisbus console script is not installed (pip install -e .)")
    publish_versions(url, 1, namespace=NS)
    proc = subprocess.Popen([script, "--url", url, "-n", NS, "watch", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline().decode()
        assert first.startswith(f"watching namespace '{NS}'")
        proc.stdout.close()  # what head does after its first line
        for seed in range(3, 6):  # each commit is a line to write into the closed pipe
            publish_versions(url, 1, namespace=NS, start_seed=seed)
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        proc.wait(timeout=30)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", err
