"""Security on real redis-server processes: TLS, ACL users, signed versions, secrets kept out of sight."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from helpers import bit_identical, make_policy, wait_until, zeros_like_policy
from redisbus import (
    BusConfig,
    BusConnectionError,
    ConfigError,
    PublishError,
    RedisBusError,
    RedisCommandError,
    WeightPublisher,
    WeightSubscriber,
)
from redisbus.keys import KeySpace
from redisbus.retention import collect
from redisbus.wire import chunk_checksum, decode_manifest, encode_manifest

ROOT = Path(__file__).resolve().parents[1]
ACL_SCRIPT = ROOT / "scripts" / "acl.py"
NS = "sec"
FAST = {"poll_interval": 0.1, "heartbeat_interval": 0.1, "socket_timeout": 2.0, "backoff_cap": 0.2}
PASSWORD = "pw-Zq8-s3cret"
SIGNING_KEY = "sk-Xk2-s3cret-signing"


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second CA, and a server certificate from it that names only ``bus.example.internal``."""
    trustme = pytest.importorskip("trustme")
    directory = tmp_path_factory.mktemp("other-pki")
    ca = trustme.CA()
    server = ca.issue_cert("bus.example.internal")
    paths = {}
    for name, blob in {"ca": ca.cert_pem, "cert": server.cert_chain_pems[0], "key": server.private_key_pem}.items():
        paths[name] = str(directory / f"{name}.pem")
        blob.write_to_path(paths[name])
    return paths


def test_tls_round_trip_with_options_as_keywords_and_as_url_query(redis_server_factory, tls_certs):
    server = redis_server_factory(tls=tls_certs)
    assert server.url.startswith("rediss://")
    config = BusConfig.from_url(server.url)
    assert config.ssl and config.ssl_check_hostname  # hostname checks are on unless turned off
    assert config.connection_kwargs()["ssl_cert_reqs"] == "required"
    query = f"{server.url}?ssl_ca_certs={tls_certs['ca']}"
    assert BusConfig.from_url(query).ssl_ca_certs == tls_certs["ca"]
    target = zeros_like_policy()
    with WeightPublisher(server.url, namespace=NS, ssl_ca_certs=tls_certs["ca"]) as pub, WeightSubscriber(
        query, namespace=NS, target=target, apply="immediate", **FAST
    ) as sub:
        sub.start()
        for seed in (1, 2):
            version = pub.publish(make_policy(seed))
            assert sub.wait_for_version(version, timeout=10) == version
        assert bit_identical(target, make_policy(2))
        assert sub.stats()["errors"] == 0


def test_tls_with_a_ca_that_did_not_sign_the_server_fails_clearly(redis_server_factory, tls_certs, other_pki):
    server = redis_server_factory(tls=tls_certs)
    for source in (f"{server.url}?ssl_ca_certs={other_pki['ca']}", server.url):  # wrong CA; no CA (system store)
        with WeightPublisher(source, namespace=NS, backoff_cap=0.1) as pub:
            with pytest.raises(BusConnectionError, match="TLS") as caught:
                pub.latest_version()
            assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
            assert "ssl_ca_certs" in str(caught.value)
            with pytest.raises(PublishError, match="certificate verify failed"):
                pub.publish(make_policy(1))
    with WeightSubscriber(server.url, namespace=NS, target=zeros_like_policy(), backoff_cap=0.1,
                          ssl_ca_certs=other_pki["ca"]) as sub:
        with pytest.raises(BusConnectionError, match="TLS handshake failed"):
            sub.sync()


def test_tls_host_name_not_in_the_certificate_is_refused_unless_checks_are_off(redis_server_factory, other_pki):
    server = redis_server_factory(tls=other_pki)  # the certificate names bus.example.internal, not 127.0.0.1
    with WeightPublisher(server.url, namespace=NS, ssl_ca_certs=other_pki["ca"]) as pub:
        with pytest.raises(BusConnectionError, match="not valid for '127.0.0.1'") as caught:
            pub.latest_version()
        assert "TLS handshake failed" in str(caught.value)
    # an explicit opt-out (e.g. connecting through an SSH tunnel) still verifies the chain
    with WeightPublisher(f"{server.url}?ssl_check_hostname=false", namespace=NS, ssl_ca_certs=other_pki["ca"]) as pub:
        assert pub.publish(make_policy(1)) == 1


def test_plain_connection_to_a_tls_port_fails_fast_and_says_why(redis_server_factory, tls_certs, redis_server):
    tls_server = redis_server_factory(tls=tls_certs)
    plain_url = f"redis://127.0.0.1:{tls_server.port}/0"
    started = time.monotonic()
    with WeightPublisher(plain_url, namespace=NS) as pub:  # default socket_timeout: 10 s
        with pytest.raises(BusConnectionError, match="use rediss://"):
            pub.latest_version()
    assert time.monotonic() - started < 5.0
    # the reverse mistake gets no answer to its handshake: it costs one socket_timeout, not one per retry
    started = time.monotonic()
    with WeightPublisher(redis_server.url.replace("redis://", "rediss://"), namespace=NS, socket_timeout=1.0,
                         ssl_ca_certs=tls_certs["ca"]) as pub:
        with pytest.raises(BusConnectionError, match="use redis://"):
            pub.latest_version()
    assert time.monotonic() - started < 3.0


def test_mutual_tls_needs_the_client_certificate(redis_server_factory, tls_certs):
    server = redis_server_factory(tls={**tls_certs, "auth_clients": "yes"})
    with WeightPublisher(server.url, namespace=NS, ssl_ca_certs=tls_certs["ca"], backoff_cap=0.1) as pub:
        with pytest.raises(BusConnectionError, match="(?i)certificate"):
            pub.latest_version()
    with_cert = (f"{server.url}?ssl_ca_certs={tls_certs['ca']}&ssl_certfile={tls_certs['client_cert']}"
                 f"&ssl_keyfile={tls_certs['client_key']}")
    target = zeros_like_policy()
    with WeightPublisher(with_cert, namespace=NS) as pub, WeightSubscriber(
        with_cert, namespace=NS, target=target, apply="immediate", **FAST
    ) as sub:
        sub.start()
        version = pub.publish(make_policy(5))
        assert sub.wait_for_version(version, timeout=10) == version
        assert bit_identical(target, make_policy(5))


# --------------------------------------------------------------------------- ACL


def load_acl_script():
    spec = importlib.util.spec_from_file_location("redisbus_acl_script", ACL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


acl_script = load_acl_script()
ROLE_PASSWORDS = {"REDISBUS_PUBLISHER_PASSWORD": "pub-Pw-s3cret", "REDISBUS_WORKER_PASSWORD": "wrk-Pw-s3cret",
                  "REDISBUS_OPS_PASSWORD": "ops-Pw-s3cret"}


def run_acl_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/acl.py`` in this process (a subprocess would spend seconds importing torch)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: v for k, v in os.environ.items() if k.startswith("REDISBUS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = acl_script.main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        for k in env or {}:
            os.environ.pop(k, None)
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def server_version(client: redis.Redis) -> str:
    major, minor = str(client.info("server")["redis_version"]).split(".")[:2]
    return f"{major}.{minor}"


def parse_setusers(text: str) -> dict[str, list[str]]:
    """User name -> rule tokens, parsed from the ``ACL SETUSER`` lines the script prints."""
    users = {}
    for line in text.splitlines():
        if line.startswith("ACL SETUSER"):
            _, _, name, *tokens = shlex.split(line)
            users[name] = tokens
    return users


def printed_users(namespace: str, version: str, *options: str) -> dict[str, list[str]]:
    """User name -> rule tokens of every role, as the script prints them."""
    result = run_acl_script("--namespace", namespace, "--redis-version", version, *options)
    assert result.returncode == 0, result.stderr
    users = parse_setusers(result.stdout)
    assert list(users) == [f"rb-{namespace}-{role}" for role in ("publisher", "worker", "ops")]
    return users


@pytest.fixture
def acl_server(redis_server_factory):
    """A Redis 7 whose default user needs a password, with the printed users of namespaces ``acl`` and ``acl2``."""
    server = redis_server_factory(password="admin-pw")
    admin = server.client()
    version = server_version(admin)
    if int(version.split(".")[0]) < 7:
        pytest.skip(f"redis-server {version}: read-only key patterns need Redis 7")
    users = {}
    for namespace in ("acl", "acl2"):
        users.update(printed_users(namespace, version))
    for name, tokens in users.items():
        admin.execute_command("ACL", "SETUSER", name, *tokens, f">{name}-pw")
    server.admin = admin
    server.users = users
    server.version = version
    return server


def user_url(server, namespace: str, role: str, db: int = 0) -> str:
    name = f"rb-{namespace}-{role}"
    return f"redis://{name}:{name}-pw@127.0.0.1:{server.port}/{db}"


#: What the tests' admin connection itself runs (counted too, but not by the users under test).
ADMIN_OWN = {"config|resetstat", "info", "acl|log", "acl|setuser", "acl|getuser", "hexists", "pubsub|numsub", "hello"}


def used_commands(admin: redis.Redis) -> set[str]:
    """Commands run since the last CONFIG RESETSTAT and allowed: neither the admin's, nor refused, nor HELLO
    (the handshake that carries AUTH needs no permission)."""
    refused = {obj for _, obj in denials(admin)}
    return {name.removeprefix("cmdstat_") for name in admin.info("commandstats")} - ADMIN_OWN - refused


def granted_commands(tokens: list[str]) -> set[str]:
    return {t[1:] for t in tokens if t.startswith("+") and not t.startswith("+@")}


def denials(admin: redis.Redis) -> list[tuple[str, str]]:
    return [(str(e["username"]), str(e["object"])) for e in admin.acl_log()]


def reset_counts(admin: redis.Redis) -> None:
    admin.config_resetstat()
    admin.acl_log_reset()


def test_acl_script_prints_usage_and_refuses_bad_input():
    result = subprocess.run([sys.executable, str(ACL_SCRIPT), "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0 and result.stdout.startswith("usage: scripts/acl.py"), result.stderr
    usage = " ".join(result.stdout.split("\n\n")[0].split())
    assert " ".join(acl_script.__doc__.split("\n\n")[1].split()) == usage  # the docstring's usage line is --help's
    assert "Exit status" in acl_script.__doc__ and "Exit status" in result.stdout
    for args, needle in ((("--namespace", "bad ns"), "invalid namespace"),
                         (("--namespace", "ok", "--redis-version", "6.2"), "Redis 7.0 or newer"),
                         (("--roles", "publisher,admin"), "unknown role"),
                         (("--db", "-1"), "--db")):
        result = run_acl_script(*args)
        assert result.returncode == 2 and needle in result.stderr, result.stderr
    result = run_acl_script("--apply", "--url", "redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert all(name in result.stderr for name in ROLE_PASSWORDS), result.stderr
    result = run_acl_script("--apply", env=ROLE_PASSWORDS)
    assert result.returncode == 2 and "REDISBUS_ADMIN_URL" in result.stderr
    # --roles picks the users; --apply then needs only their passwords
    result = run_acl_script("--roles", "ops", "--apply", "--url", "redis://127.0.0.1:1/0",
                            env={"REDISBUS_OPS_PASSWORD": "x"})
    assert result.returncode == 4 and "cannot reach Redis" in result.stderr, result.stderr
    printed = parse_setusers(run_acl_script("--namespace", "ns", "--roles", "worker,ops").stdout)
    assert list(printed) == ["rb-ns-worker", "rb-ns-ops"]


def test_one_acl_script_and_nothing_refers_to_the_old_one():
    assert not (ROOT / "scripts" / "acl_setup.py").exists()
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docker").iterdir(),
                 *(ROOT / "scripts").glob("*.py"), *(ROOT / "redisbus").glob("*.py")]:
        assert not path.is_file() or "acl_setup" not in path.read_text(errors="replace"), path


def test_printed_rules_carry_each_password_only_as_its_sha256():
    result = run_acl_script("--namespace", "ppo", "--ops-user", "operator", env=ROLE_PASSWORDS)
    assert result.returncode == 0, result.stderr
    users = parse_setusers(result.stdout)
    assert list(users) == ["rb-ppo-publisher", "rb-ppo-worker", "operator"]
    for tokens, password in zip(users.values(), ROLE_PASSWORDS.values()):
        assert tokens[-1] == "#" + hashlib.sha256(password.encode()).hexdigest()
    assert "s3cret" not in result.stdout + result.stderr
    assert "no password yet" not in result.stdout  # the note only shows when a password is missing
    worker = users["rb-ppo-worker"]
    assert {"%R~rb:{ppo}:*", "%R~rb:chunk:{ppo:*", "%RW~rb:{ppo}:workers", "&rb:{ppo}:notify"} <= set(worker)
    assert not {t for t in worker if t.startswith("~")}  # read-only keys, but for its heartbeat hash
    assert not granted_commands(worker) & {"set", "del", "publish", "eval", "evalsha", "hdel", "config|get"}
    for tokens in users.values():
        assert tokens[:5] == ["reset", "on", "resetkeys", "resetchannels", "-@all"]
        assert not [t for t in tokens if t.startswith(("+@", "~*", "&*", "allkeys", "allchannels", "allcommands"))]
    # options add exactly one command each: WAIT to publisher and ops, SELECT to everyone
    plain = {name: granted_commands(tokens) for name, tokens in printed_users("ppo", "7.2").items()}
    for option, added, roles in ((("--wait",), {"wait"}, ("publisher", "ops")),
                                 (("--db", "3"), {"select"}, ("publisher", "worker", "ops"))):
        changed = {name: granted_commands(tokens) for name, tokens in printed_users("ppo", "7.2", *option).items()}
        for name in plain:
            expected = added if name.rsplit("-", 1)[1] in roles else set()
            assert changed[name] - plain[name] == expected and plain[name] <= changed[name], (option, name)
    for name, tokens in printed_users("ppo", "7.0").items():
        assert granted_commands(tokens) == plain[name] - {"client|setinfo"}  # 7.0 has no CLIENT SETINFO


def test_publisher_and_worker_run_with_exactly_the_printed_rights(acl_server):
    admin, users = acl_server.admin, acl_server.users
    keys = KeySpace("acl")
    publisher_rights = granted_commands(users["rb-acl-publisher"])
    worker_rights = granted_commands(users["rb-acl-worker"])

    # The publisher alone: publish, evict an old version with a grace expiry, collect an orphan chunk.
    reset_counts(admin)
    with WeightPublisher(user_url(acl_server, "acl", "publisher"), namespace="acl", keep_versions=1,
                         grace_seconds=30, health_check_interval=0.05) as pub:
        for seed in range(3):
            pub.publish(make_policy(seed))
            time.sleep(0.1)  # lets a health check (PING) fall due
        assert pub.latest_version() == 3
        pub._client.set(keys.chunk(99, 0), b"left by a publisher that died")  # an orphan of an uncommitted version
        report = collect(pub._client, keys, keep=1, grace_seconds=0, pending_timeout=0)
        assert report.orphan_versions == [99]
    assert used_commands(admin) == publisher_rights
    assert denials(admin) == [("rb-acl-publisher", "config|get")]  # harmless: the chunk size stays as configured

    # The worker alone: subscribe, catch up, pull, heartbeat, health checks.
    reset_counts(admin)
    target = zeros_like_policy()
    with WeightSubscriber(user_url(acl_server, "acl", "worker"), namespace="acl", target=target,
                          worker_id="w1", apply="immediate", health_check_interval=0.05, **FAST) as sub:
        sub.start()
        assert sub.wait_for_version(3, timeout=10) == 3
        assert wait_until(lambda: "ping" in used_commands(admin) and admin.hexists(keys.workers, "w1"))
        assert sub.stats()["errors"] == 0
    assert bit_identical(target, make_policy(2))
    assert used_commands(admin) == worker_rights
    assert denials(admin) == []


def run_cli(url: str, *args: str, namespace: str = "acl") -> Any:
    from click.testing import CliRunner

    from redisbus.cli import cli

    return CliRunner().invoke(cli, list(args), env={"REDISBUS_URL": url, "REDISBUS_NAMESPACE": namespace,
                                                    "COLUMNS": "200"})


def test_ops_user_runs_every_cli_command_with_exactly_the_printed_rights(acl_server, tmp_path):
    """Every `redisbus` command but `demo` (which runs its own trainer and workers) as the ops user: the commands
    the server counted are exactly those granted (nothing refused but CONFIG GET, nothing granted unused)."""
    from redisbus.cli import cli
    from redisbus.ops import BusAdmin
    from redisbus.registry import WorkerReport, report_worker

    admin, users = acl_server.admin, acl_server.users
    keys = KeySpace("acl")
    ops_rights = granted_commands(users["rb-acl-ops"])
    ops_url = user_url(acl_server, "acl", "ops") + "?health_check_interval=0.05"  # health checks (PING) fall due
    # The scene, set by the publisher and the admin before counting: 3 versions, a worker report that went
    # silent an hour ago, a chunk and a pending mark left by a publisher that died, no scripts loaded yet.
    with WeightPublisher(user_url(acl_server, "acl", "publisher"), namespace="acl") as pub:
        for seed in range(3):
            pub.publish(make_policy(seed))
    long_ago = time.time() - 3600
    report_worker(admin, keys, WorkerReport("w-gone", 1, long_ago, long_ago, "host-1", 4321))
    admin.set(keys.chunk(99, 0), b"left by a publisher that died")
    admin.zadd(keys.pending, {"99": long_ago})
    admin.script_flush()  # rollback / import load the commit scripts themselves
    weights_file = tmp_path / "policy.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, weights_file)
    reset_counts(admin)

    def ok(*args: str) -> str:
        result = run_cli(ops_url, *args)
        assert result.exit_code == 0, (args, result.output)
        assert "rb-acl-ops-pw" not in result.output
        return result.output

    ran = []
    for args in (["status"], ["versions"], ["inspect"], ["inspect", "1", "--stats"], ["verify", "--all"],
                 ["verify", "2"], ["diff", "1", "2"], ["workers"], ["pin", "2"], ["unpin"], ["rollback", "1"],
                 ["import", str(weights_file)], ["export", "latest", str(tmp_path / "latest.safetensors")]):
        ok(*args)
        ran.append(args[0])
    # watch sees a version committed while it runs (by a rollback of the ops user, from another thread)
    def commit_while_watching() -> None:
        assert wait_until(lambda: admin.pubsub_numsub(keys.notify)[0][1] >= 1)
        time.sleep(0.5)  # a few polls 0.1 s apart: health checks (PING) fall due
        with BusAdmin(ops_url, namespace="acl") as other:
            other.rollback(2)

    thread = threading.Thread(target=commit_while_watching)
    thread.start()
    try:
        watched = ok("watch", "--count", "1", "--timeout", "20", "--interval", "0.1")
    finally:
        thread.join()
    assert "committed" in watched
    ran.append("watch")
    assert "pruned 1 dead worker(s): w-gone" in ok("workers", "--prune")
    assert "would evict" in ok("gc", "--keep", "2", "--dry-run")
    assert "orphans" in ok("gc", "--keep", "2")  # grace: PEXPIRE; the orphan chunk of v99 is found by SCAN
    assert "evicted" in ok("gc", "--keep", "1", "--grace", "0")  # no grace: DEL
    ran += ["workers", "gc"]
    assert set(cli.commands) - {"demo"} == set(ran), "a CLI command the ops rules were not checked with"
    assert used_commands(admin) == ops_rights
    assert denials(admin) == [("rb-acl-ops", "config|get")]  # rollback / import keep their chunk size
    assert admin.zcard(keys.pending) == 0 and admin.pttl(keys.chunk(99, 0)) > 0  # the orphan fades

    # confined to its namespace: one line, exit 5, no password
    for args in (["versions"], ["pin", "1"], ["gc"]):
        denied = run_cli(ops_url, *args, namespace="acl2")
        assert denied.exit_code == 5, denied.output
        assert denied.stderr.startswith("Error: ") and "no permissions" in denied.stderr and denied.stderr.count("\n") == 1
        assert "rb-acl-ops-pw" not in denied.output


def test_worker_cannot_write_or_publish_and_nobody_leaves_their_namespace(acl_server):
    keys, other = KeySpace("acl"), KeySpace("acl2")
    with WeightPublisher(user_url(acl_server, "acl", "publisher"), namespace="acl") as pub:
        pub.publish(make_policy(1))
    worker = redis.Redis.from_url(user_url(acl_server, "acl", "worker"))
    publisher = redis.Redis.from_url(user_url(acl_server, "acl", "publisher"))
    ops = redis.Redis.from_url(user_url(acl_server, "acl", "ops"))
    try:
        assert worker.get(keys.latest) == b"1"
        assert worker.hset(keys.workers, "w", b"report") == 1  # its one write: the heartbeat hash
        writes = [
            lambda c, k: c.set(k.latest, 99),
            lambda c, k: c.set(k.chunk(1, 0), b"evil"),
            lambda c, k: c.set(k.manifest(5), b"evil"),
            lambda c, k: c.delete(k.latest),
            lambda c, k: c.incr(k.seq),
            lambda c, k: c.zadd(k.versions, {"9": 9}),
            lambda c, k: c.hset(k.publishers, "x", b"y"),
            lambda c, k: c.hset(k.pin, "x", b"y"),
            lambda c, k: c.pexpire(k.latest, 1),
            lambda c, k: c.publish(k.notify, b"evil"),
            lambda c, k: c.eval("return 1", 0),
            lambda c, k: c.config_get("requirepass"),
        ]
        for write in writes:
            with pytest.raises(redis.exceptions.NoPermissionError):
                write(worker, keys)
        reads_elsewhere = [
            lambda c, k: c.get(k.latest),
            lambda c, k: c.get(k.chunk(1, 0)),
            lambda c, k: c.hset(k.workers, "w", b"x"),
            lambda c, k: c.publish(k.notify, b"x"),
        ]
        no_role_needs = [
            lambda c: c.config_get("requirepass"),
            lambda c: c.eval("return 1", 0),
            lambda c: c.flushall(),
            lambda c: c.keys("*"),
            lambda c: c.info(),
            lambda c: c.execute_command("ACL", "LIST"),
            lambda c: c.client_list(),
        ]
        for client in (worker, publisher, ops):
            for action in reads_elsewhere + writes[:3]:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    action(client, other)
            for action in no_role_needs:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    action(client)
            pubsub = client.pubsub()
            pubsub.subscribe(other.notify)
            with pytest.raises(redis.exceptions.NoPermissionError):
                pubsub.get_message(timeout=2)
            pubsub.close()
    finally:
        worker.close()
        publisher.close()
        ops.close()
    # the same refusals through the bus API: clear errors, not hangs
    with WeightPublisher(user_url(acl_server, "acl", "publisher"), namespace="acl2") as pub:
        with pytest.raises(PublishError, match="NOPERM"):
            pub.publish(make_policy(1))
    with WeightSubscriber(user_url(acl_server, "acl", "worker"), namespace="acl2", target=zeros_like_policy()) as sub:
        with pytest.raises(RedisCommandError, match="NOPERM"):
            sub.sync()
    # a worker user cannot publish weights even through the library
    with WeightPublisher(user_url(acl_server, "acl", "worker"), namespace="acl") as pub:
        with pytest.raises(PublishError, match="NOPERM"):
            pub.publish(make_policy(2))
    assert int(acl_server.admin.get(keys.latest)) == 1


def test_acl_apply_creates_the_printed_users_and_prints_no_password(redis_server_factory):
    server = redis_server_factory(password="admin-pw")
    admin = server.client()
    version = server_version(admin)
    if int(version.split(".")[0]) < 7:
        pytest.skip("needs Redis 7")
    env = {**ROLE_PASSWORDS, "REDISBUS_ADMIN_URL": server.url}
    result = run_acl_script("--namespace", "applied", "--apply", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("applied ACL user 'rb-applied-") == 3
    printed = run_acl_script("--namespace", "applied", "--redis-version", version, env=env)
    for text in (result.stdout + result.stderr, printed.stdout + printed.stderr):
        assert "s3cret" not in text and "admin-pw" not in text
    users = parse_setusers(printed.stdout)
    assert list(users) == ["rb-applied-publisher", "rb-applied-worker", "rb-applied-ops"]
    for name, tokens in users.items():
        user = admin.acl_getuser(name)
        commands = user["commands"]
        commands = commands.split() if isinstance(commands, str) else [str(c) for c in commands]
        assert {c for c in commands if c.startswith("+")} == {t for t in tokens if t.startswith("+")}
        assert ["#" + user["passwords"][0]] == [t for t in tokens if t.startswith("#")]  # the hash, never the password
    listed = admin.acl_list()
    assert run_acl_script("--namespace", "applied", "--apply", env=env).returncode == 0
    assert admin.acl_list() == listed  # re-running changes nothing
    with WeightPublisher(f"redis://rb-applied-publisher:pub-Pw-s3cret@127.0.0.1:{server.port}/0",
                         namespace="applied") as pub:
        assert pub.publish(make_policy(1)) == 1
    listing = run_cli(f"redis://rb-applied-ops:ops-Pw-s3cret@127.0.0.1:{server.port}/0", "versions", "--json",
                      namespace="applied")
    assert listing.exit_code == 0 and '"version": 1' in listing.stdout, listing.output
    # wrong admin credentials, or a user that may not run ACL SETUSER: a clear error, no secret
    for url, needle in ((f"redis://:not-the-admin-pw@127.0.0.1:{server.port}/0", "authentication"),
                        (f"redis://rb-applied-ops:ops-Pw-s3cret@127.0.0.1:{server.port}/0", "NOPERM")):
        bad = run_acl_script("--namespace", "applied", "--apply", env={**env, "REDISBUS_ADMIN_URL": url})
        assert bad.returncode == 4 and needle in bad.stderr, bad.stderr
        assert "not-the-admin-pw" not in bad.stderr and "s3cret" not in bad.stderr


def test_db_and_wait_add_the_select_and_wait_those_set_ups_send(redis_server_factory):
    """--db N (SELECT) and --wait (WAIT, for wait_replicas): each role then runs on database 1, publisher and ops
    WAIT for a replica (none answers: WAIT times out and the commit goes on), and nothing is refused."""
    server = redis_server_factory(password="admin-pw")
    admin = server.client()
    version = server_version(admin)
    if int(version.split(".")[0]) < 7:
        pytest.skip("needs Redis 7")
    users = printed_users("aclw", version, "--db", "1", "--wait")
    for name, tokens in users.items():
        admin.execute_command("ACL", "SETUSER", name, *tokens, f">{name}-pw")
    wait = "?wait_replicas=1&wait_timeout=0.1"

    def publisher() -> None:
        with WeightPublisher(user_url(server, "aclw", "publisher", db=1) + wait, namespace="aclw") as pub:
            assert pub.publish(make_policy(1)) == 1

    def worker() -> None:
        with WeightSubscriber(user_url(server, "aclw", "worker", db=1), namespace="aclw",
                              target=zeros_like_policy()) as sub:
            assert sub.sync() == 1

    def ops() -> None:
        result = run_cli(user_url(server, "aclw", "ops", db=1) + wait, "rollback", "1", namespace="aclw")
        assert result.exit_code == 0, result.output

    for role, run, sent in (("publisher", publisher, {"select", "wait"}), ("worker", worker, {"select"}),
                            ("ops", ops, {"select", "wait"})):
        reset_counts(admin)
        run()
        used = used_commands(admin)
        assert sent <= used <= granted_commands(users[f"rb-aclw-{role}"]), role
        assert set(denials(admin)) <= {(f"rb-aclw-{role}", "config|get")}, role
    with redis.Redis(port=server.port, password="admin-pw", db=1) as db1:
        assert db1.get(KeySpace("aclw").latest) == b"2"
    assert admin.dbsize() == 0


# --------------------------------------------------------------------------- signing


def tamper_chunk_and_checksum(client: redis.Redis, keys: KeySpace, version: int) -> None:
    """What someone with write access but no key can do: new bytes, and a manifest whose xxh3 matches them."""
    chunk_key = keys.chunk(version, 0)
    data = bytearray(client.get(chunk_key))
    data[:8] = b"\xff" * 8
    client.set(chunk_key, bytes(data))
    manifest = decode_manifest(client.get(keys.manifest(version)))
    checksums = (chunk_checksum(memoryview(bytes(data))),) + tuple(manifest.chunk_checksums[1:])
    from dataclasses import replace

    client.set(keys.manifest(version), encode_manifest(replace(manifest, chunk_checksums=checksums)))


def test_worker_requiring_signatures_refuses_unsigned_and_tampered_versions(redis_server):
    raw = redis_server.client()
    keys = KeySpace(NS)
    target = zeros_like_policy()
    signed = {"signing_key": SIGNING_KEY}
    with WeightSubscriber(redis_server.url, namespace=NS, target=target, require_signature=True, **signed) as sub:
        with WeightPublisher(redis_server.url, namespace=NS) as unsigned_pub:
            unsigned_pub.publish(make_policy(1))  # v1: no signature
        assert sub.sync() is None
        assert bit_identical(target, zeros_like_policy())
        assert "unsigned" in sub.stats()["last_error"]
        with WeightPublisher(redis_server.url, namespace=NS, **signed) as pub:
            assert pub.publish(make_policy(2)) == 2
            assert sub.sync() == 2
            assert bit_identical(target, make_policy(2))
            pub.publish(make_policy(3))
            tamper_chunk_and_checksum(raw, keys, 3)
            assert sub.sync() is None
            assert "invalid signature" in sub.stats()["last_error"]
            pub.publish(make_policy(4))
            manifest = decode_manifest(raw.get(keys.manifest(4)))
            from dataclasses import replace

            raw.set(keys.manifest(4), encode_manifest(replace(manifest, signature=None)))  # signature stripped
            assert sub.sync() is None
            assert "unsigned" in sub.stats()["last_error"]
            with WeightPublisher(redis_server.url, namespace=NS, signing_key=b"another key") as other:
                other.publish(make_policy(5))
            assert sub.sync() is None
            assert bit_identical(target, make_policy(2))  # every refusal left the target bit-identical
            stats = sub.stats()
            assert stats["errors_by_type"] == {"SignatureError": 4}
            assert stats["failed_versions"] == [1, 3, 4, 5]
            assert pub.publish(make_policy(6)) == 6  # the next good version still goes through
            assert sub.sync() == 6
            assert bit_identical(target, make_policy(6))
    # A worker without the key accepts the rewritten chunk: the xxh3 checksums only catch accidents.
    with WeightPublisher(redis_server.url, namespace=NS) as pub:
        v = pub.publish(make_policy(7))
    tamper_chunk_and_checksum(raw, keys, v)
    naive = zeros_like_policy()
    with WeightSubscriber(redis_server.url, namespace=NS, target=naive) as sub:
        assert sub.sync() == v
    assert not bit_identical(naive, make_policy(7))


def test_signed_chunk_digests_catch_a_chunk_whose_checksum_still_matches(redis_server, monkeypatch):
    import redisbus.subscriber as subscriber_module

    keys = KeySpace(NS)
    raw = redis_server.client()
    with WeightPublisher(redis_server.url, namespace=NS, signing_key=SIGNING_KEY) as pub:
        pub.publish(make_policy(1))
    data = bytearray(raw.get(keys.chunk(1, 0)))
    data[-1] ^= 0xFF
    raw.set(keys.chunk(1, 0), bytes(data))
    monkeypatch.setattr(subscriber_module, "verify_chunks", lambda *a, **k: None)  # as if xxh3 collided
    target = zeros_like_policy()
    with WeightSubscriber(redis_server.url, namespace=NS, target=target, signing_key=SIGNING_KEY) as sub:
        assert sub.sync() is None
        assert "chunk 0 differs from its signed digest" in sub.stats()["last_error"]
    assert bit_identical(target, zeros_like_policy())


def test_signing_settings(monkeypatch):
    with pytest.raises(ConfigError, match="require_signature"):
        BusConfig(require_signature=True)
    assert BusConfig(signing_key="text key").signing_key == b"text key"
    monkeypatch.setenv("REDISBUS_SIGNING_KEY", SIGNING_KEY)
    config = BusConfig.from_env("redis://127.0.0.1:1/0", require_signature=True)
    assert config.signing_key == SIGNING_KEY.encode() and config.require_signature
    with pytest.raises(ConfigError, match="unknown Redis URL option 'signing_key'"):
        BusConfig.from_url(f"redis://127.0.0.1:1/0?signing_key={SIGNING_KEY}")  # never in a URL


# --------------------------------------------------------------------------- secrets


def assert_secret_free(text: str) -> None:
    for secret in (PASSWORD, SIGNING_KEY, "s3cret"):
        assert secret not in text, text


def full_text(exc: BaseException) -> str:
    """The error as a user sees it: message, cause chain and traceback."""
    return "".join(traceback.format_exception(exc))


def test_secrets_stay_out_of_reprs_errors_and_logs(redis_server_factory, free_port, tls_certs, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, redis-py's included
    server = redis_server_factory(password="the-right-one")
    wrong = f"redis://user:{PASSWORD}@127.0.0.1:{server.port}/0"
    config = BusConfig.from_url(wrong, signing_key=SIGNING_KEY)
    with_replica = BusConfig.from_url(f"{wrong}?replicas=redis://:{PASSWORD}@127.0.0.1:{free_port}/0")
    texts = [repr(config), str(config), config.redacted_url(), repr(with_replica), with_replica.redacted_url()]
    errors: list[BaseException] = []
    with WeightPublisher(config, namespace=NS) as pub, WeightSubscriber(
        config, namespace=NS, target=zeros_like_policy(), **FAST
    ) as sub:
        texts += [repr(pub), repr(sub), repr(pub.config)]
        for call in (pub.latest_version, lambda: pub.publish(make_policy(1)), sub.sync):
            with pytest.raises(RedisBusError) as caught:
                call()
            errors.append(caught.value)
        sub.start()
        assert wait_until(lambda: sub.stats()["reconnects"] >= 2, timeout=10)
        texts.append(str(sub.stats()))
    assert "authentication" in str(errors[0])
    # unreachable, TLS failure, malformed URLs: all carry the password
    for url in (f"redis://:{PASSWORD}@127.0.0.1:{free_port}/0",
                f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs={tls_certs['ca']}"):
        with WeightPublisher(url, namespace=NS, socket_timeout=1.0, signing_key=SIGNING_KEY) as pub:
            with pytest.raises(RedisBusError) as caught:
                pub.publish(make_policy(1))
            errors.append(caught.value)
    for url in (f"redis://:{PASSWORD}@127.0.0.1:notaport/0", f"redis://:{PASSWORD}@127.0.0.1:1/x",
                f"redis://:{PASSWORD}@127.0.0.1:1/0?chunk_size=big", f"redis://:{PASSWORD}@127.0.0.1:1/0?password=x",
                f"ftp://:{PASSWORD}@127.0.0.1:1/0"):
        with pytest.raises(ConfigError) as caught:
            WeightPublisher(url, namespace=NS)
        errors.append(caught.value)
    texts += [full_text(e) for e in errors]
    texts.append(caplog.text)
    assert any("lost Redis" in r.getMessage() for r in caplog.records)  # the failures were logged...
    for text in texts:
        assert_secret_free(text)  # ...without a secret


def test_cli_never_prints_the_signing_key(redis_server):
    with WeightPublisher(redis_server.url, namespace=NS, signing_key=SIGNING_KEY) as pub:
        pub.publish(make_policy(1))
    from click.testing import CliRunner

    from redisbus.cli import cli

    outputs = []
    for key, expected in ((SIGNING_KEY, 0), ("a-wrong-s3cret-key", 1)):
        env = {"REDISBUS_URL": redis_server.url, "REDISBUS_NAMESPACE": NS, "REDISBUS_SIGNING_KEY": key}
        for args in (("verify", "--all"), ("verify", "--all", "--json"), ("inspect", "1", "--json"), ("status",)):
            result = CliRunner().invoke(cli, list(args), env=env)
            if args[0] == "verify":
                assert result.exit_code == expected, result.output
            outputs.append(result.output)
    assert any("signature" in text for text in outputs)
    for text in outputs:
        assert SIGNING_KEY not in text and "a-wrong-s3cret-key" not in text
