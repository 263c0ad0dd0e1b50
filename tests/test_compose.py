"""docker/compose*.yaml proven without a Docker engine: every service runs as a local process.

:class:`LocalCompose` reads a compose file the way ``docker compose up`` does
(YAML anchors and merge keys, ``${VAR}`` / ``${VAR:-default}`` /
``${VAR:?error}`` interpolation, ``depends_on`` conditions, healthchecks,
``deploy.replicas``) and starts each service's exact command with exactly its
environment, plus the image's ``ENV`` lines from docker/Dockerfile. What stands
in for the container world:

* service host names: ``<service>:6379`` becomes ``127.0.0.1:<port>``, where a
  Redis service (image ``redis:*`` running ``redis-server``) listens on a free
  port instead of 6379 (inside its own command and healthcheck, its own
  ``6379`` is that port too); it also binds to 127.0.0.1 only;
* the images' programs: a directory first on ``PATH`` links ``redis-server``
  and ``redis-cli`` to /usr/bin's (Redis 7), ``python`` to this interpreter and
  ``redisbus`` to the console script installed next to it;
* the image's files: a path under the Dockerfile's ``WORKDIR`` maps to the
  repository path the Dockerfile ``COPY``s there (and must exist).

Then the tests check what a user of ``docker compose up`` expects: the trainer
publishes, every worker applies the trainer's exact weights (equal digests per
version), the ops loop lists the workers, and the ACL users are in force.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cluster_fixtures import find_binary, pick_cluster_port

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CONTAINER_PORT = "6379"

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])((?:[^{}]|\{[^{}]*\})*))?\}|\$(\w+)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation, applied to every string of ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(5)
        colon, op, arg = m.group(2), m.group(3), m.group(4)
        current = env.get(name)
        unset = current is None or (colon == ":" and current == "")
        if op == "-":
            return interpolate(arg, env) if unset else current
        if op == "?":
            if unset:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return current
        return current or ""

    return _VAR.sub(sub, value)


@dataclass
class Dockerfile:
    """What the tests need from docker/Dockerfile: ENV, WORKDIR, COPY, build args, CMD."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    copies: dict[str, Path] = field(default_factory=dict)  # image path -> repository path
    args: dict[str, str] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n", " ", path.read_text())
        out = cls()
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            word = word.upper()
            if word == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    out.env[key] = value
            elif word == "WORKDIR":
                out.workdir = rest.strip()
            elif word == "ARG":
                key, _, value = rest.strip().partition("=")
                out.args[key] = value
            elif word == "COPY":
                *sources, dest = shlex.split(rest)
                target = dest if dest.startswith("/") else os.path.normpath(os.path.join(out.workdir, dest))
                for src in sources:
                    image_path = target if len(sources) == 1 and not dest.endswith("/") else os.path.join(target, src)
                    out.copies[image_path] = ROOT / src
            elif word == "RUN":
                out.runs.append(rest)
            elif word == "CMD":
                out.cmd = yaml.safe_load(rest)
        return out

    def local_path(self, image_path: str) -> str | None:
        """The repository path behind a file of the image, or None if no COPY puts it there."""
        for dest, source in sorted(self.copies.items(), key=lambda kv: -len(kv[0])):
            if image_path == dest or image_path.startswith(dest.rstrip("/") + "/"):
                return str(source / os.path.relpath(image_path, dest)) if image_path != dest else str(source)
        return None


@dataclass
class Instance:
    service: str
    index: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LocalCompose:
    """Runs a compose file's services as local processes (see the module docstring)."""

    def __init__(self, compose_file: Path, env: dict[str, str], scale: dict[str, int] | None = None) -> None:
        self.file = compose_file
        self.spec = interpolate(yaml.safe_load(compose_file.read_text()), env)
        self.services: dict[str, dict[str, Any]] = self.spec["services"]
        self.image = Dockerfile.parse(DOCKER / "Dockerfile")
        self.scale = scale or {}
        self.root = Path(tempfile.mkdtemp(prefix="rb-compose-"))
        self.bin = self.root / "bin"
        self.bin.mkdir()
        venv_bin = Path(sys.executable).parent
        links = {"redis-server": find_binary("redis-server"), "redis-cli": find_binary("redis-cli"),
                 "python": sys.executable, "python3": sys.executable, "redisbus": str(venv_bin / "redisbus")}  # fmt: skip
        for name, target in links.items():  # wrappers, not links: a linked venv python would not find its venv
            wrapper = self.bin / name
            wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(target)} "$@"\n')
            wrapper.chmod(0o755)
        self.redis_ports: dict[str, int] = {}
        taken: set[int] = set()
        for name, svc in self.services.items():
            if self.is_redis_server(svc):
                port = pick_cluster_port(taken)
                taken |= {port, port + 10000}
                self.redis_ports[name] = port
        self.instances: list[Instance] = []

    # -- what a service is
    @staticmethod
    def is_redis_server(svc: dict[str, Any]) -> bool:
        return str(svc.get("image", "")).startswith("redis:") and (svc.get("command") or [""])[0] == "redis-server"

    def is_app(self, svc: dict[str, Any]) -> bool:
        return "build" in svc

    def command(self, name: str) -> list[str]:
        svc = self.services[name]
        command = svc.get("command")
        if isinstance(command, str):
            command = ["sh", "-c", command]
        entrypoint = svc.get("entrypoint") or []
        if isinstance(entrypoint, str):
            entrypoint = shlex.split(entrypoint)
        argv = list(entrypoint) + list(command or (self.image.cmd if self.is_app(svc) else []))
        assert argv, f"service {name} has no command"
        argv = [self.localize(name, a) for a in argv]
        if self.is_redis_server(svc):
            argv = [argv[0], "--bind", "127.0.0.1", *argv[1:]]
        return argv

    def localize(self, name: str, text: str) -> str:
        """Map container addresses and image paths in one string to their local stand-ins."""
        for svc, port in self.redis_ports.items():
            text = re.sub(rf"(?<![\w.-]){re.escape(svc)}:{CONTAINER_PORT}\b", f"127.0.0.1:{port}", text)
        if name in self.redis_ports:
            text = re.sub(rf"(?<![\w.:]){CONTAINER_PORT}\b", str(self.redis_ports[name]), text)
        for svc in self.services:  # no host name may be left over
            assert not re.search(rf"(//|@|-h\s+){re.escape(svc)}(?![\w.-])", text), f"{svc} without :6379 in {text!r}"
        if self.is_app(self.services[name]):
            for word in re.findall(r"(?<![\w.])/[\w./-]+", text):
                if word.startswith(self.image.workdir.rstrip("/") + "/"):
                    local = self.image.local_path(word)
                    assert local is not None and Path(local).exists(), f"{word} is not COPYed into the image"
                    text = text.replace(word, local)
        return text

    def environment(self, name: str) -> dict[str, str]:
        svc = self.services[name]
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.root), "LANG": "C.UTF-8"}
        if self.is_app(svc):
            env.update(self.image.env)
        raw = svc.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        env.update({k: self.localize(name, str(v)) for k, v in raw.items() if v is not None})
        return env

    def replicas(self, name: str) -> int:
        return self.scale.get(name, (self.services[name].get("deploy") or {}).get("replicas", 1))

    # -- running
    def order(self) -> list[str]:
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...] = ()) -> None:
            assert name not in path, f"dependency cycle {path}"
            if name in done:
                return
            for dep in self.depends_on(name):
                visit(dep, (*path, name))
            done.append(name)

        for name in self.services:
            visit(name)
        return done

    def depends_on(self, name: str) -> dict[str, str]:
        deps = self.services[name].get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {d: (v or {}).get("condition", "service_started") for d, v in deps.items()}

    def start(self, name: str) -> list[Instance]:
        started = []
        argv = self.command(name)
        env = self.environment(name)
        for index in range(self.replicas(name)):
            workdir = self.root / f"{name}-{index}"
            workdir.mkdir()
            log = workdir / "output.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            instance = Instance(name, index, proc, log)
            self.instances.append(instance)
            started.append(instance)
        return started

    def healthy(self, name: str) -> bool:
        check = self.services[name].get("healthcheck") or {}
        test = check.get("test")
        if isinstance(test, str):
            argv = ["sh", "-c", test]
        elif test[0] == "CMD-SHELL":
            argv = ["sh", "-c", test[1]]
        else:
            argv = test[1:]
        argv = [self.localize(name, a) for a in argv]
        return subprocess.run(argv, env=self.environment(name), capture_output=True, timeout=10).returncode == 0

    def wait_for(self, dep: str, condition: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        mine = [i for i in self.instances if i.service == dep]
        while True:
            if condition == "service_completed_successfully":
                codes = [i.process.poll() for i in mine]
                if all(c is not None for c in codes):
                    assert all(c == 0 for c in codes), f"{dep} failed:\n" + "\n".join(i.output()[-3000:] for i in mine)
                    return
            elif condition == "service_healthy":
                if self.healthy(dep):
                    return
            else:
                return
            for i in mine:
                if condition == "service_healthy" and i.process.poll() is not None:
                    raise AssertionError(f"{dep} exited:\n{i.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{dep} did not reach {condition}:\n" + "\n".join(i.output()[-3000:] for i in mine))
            time.sleep(0.2)

    def up(self, timeout: float = 90.0) -> None:
        for name in self.order():
            for dep, condition in self.depends_on(name).items():
                self.wait_for(dep, condition, timeout)
            self.start(name)

    def of(self, name: str) -> list[Instance]:
        return [i for i in self.instances if i.service == name]

    def stop(self, name: str, timeout: float = 15.0) -> list[int | None]:
        """SIGTERM (``docker compose stop``) the service's processes and return their exit codes."""
        for i in self.of(name):
            if i.process.poll() is None:
                os.killpg(i.process.pid, signal.SIGTERM)
        codes = []
        for i in self.of(name):
            try:
                codes.append(i.process.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def down(self) -> None:
        for i in reversed(self.instances):
            if i.process.poll() is None:
                try:
                    os.killpg(i.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                i.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def dump(self) -> str:
        return "\n".join(f"----- {i.service}[{i.index}] rc={i.process.poll()}\n{i.output()[-4000:]}" for i in self.instances)


# --------------------------------------------------------------------------- helpers

PUBLISHED = re.compile(r"^published version (\d+) step \d+ digest ([0-9a-f]{64})$", re.M)
APPLIED = re.compile(r"^applied version (\d+) digest ([0-9a-f]{64})$", re.M)
FOLLOWING = re.compile(r"^worker (\S+) following ", re.M)
NOTHING_YET = re.compile(r"^Error: (no versions in|nothing found for) namespace 'demo' at \S+$")


def _secrets_env() -> dict[str, str]:
    env = {name: secrets.token_hex(16) for name in
           ("REDIS_ADMIN_PASSWORD", "REDISBUS_PUBLISHER_PASSWORD", "REDISBUS_WORKER_PASSWORD", "REDISBUS_OPS_PASSWORD")}  # fmt: skip
    env["OPS_INTERVAL"] = "2"
    return env


def _wait(predicate, timeout: float, compose: LocalCompose, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{compose.dump()}")
        time.sleep(0.25)


def _check_workers_follow_the_trainer(compose: LocalCompose, workers: int, versions: int = 3) -> None:
    """Every worker applies at least ``versions`` versions, each bit-identical to what the trainer published."""
    def applied(i: Instance) -> list[tuple[int, str]]:
        return [(int(v), d) for v, d in APPLIED.findall(i.output())]

    assert len(compose.of("worker")) == workers
    _wait(lambda: all(len(applied(i)) >= versions for i in compose.of("worker")), 90, compose, "workers to apply versions")
    ids = [FOLLOWING.search(i.output()).group(1) for i in compose.of("worker")]
    # the ops loop reports every worker (redisbus workers) and lists the versions (redisbus versions: a first
    # run may come before the trainer's first commit; each run spends seconds importing torch)
    def listed() -> bool:
        out = compose.of("ops")[0].output()
        return all(w in out for w in ids) and "versions of" in out

    _wait(listed, 90, compose, "ops to list the workers and the versions")
    assert compose.stop("trainer") == [0], compose.dump()  # SIGTERM: clean exit
    assert compose.stop("worker") == [0] * workers, compose.dump()
    published = {int(v): d for v, d in PUBLISHED.findall(compose.of("trainer")[0].output())}
    assert len(published) >= versions
    for i in compose.of("worker"):
        got = applied(i)
        assert [v for v, _ in got] == sorted({v for v, _ in got}), "versions applied in order, each once"
        for version, digest in got:
            assert published[version] == digest, f"worker {i.index} v{version}: not the trainer's weights"
    ops = compose.of("ops")[0].output()
    assert "versions of" in ops and "workers of" in ops, ops[-3000:]
    # Until the trainer's first commit the ops loop may find nothing (exit 3, one line); from its first
    # listing on, no error at all (an ACL refusal would be one).
    first = ops.index("versions of")
    early = [line for line in ops[:first].splitlines() if "Error" in line or "error:" in line]
    assert all(NOTHING_YET.match(line) for line in early), ops[:first][-3000:]
    assert "Error" not in ops[first:] and "error:" not in ops[first:], ops[-3000:]


# --------------------------------------------------------------------------- tests


def test_dockerfile_builds_one_image_with_the_console_commands():
    image = Dockerfile.parse(DOCKER / "Dockerfile")
    assert image.args.get("TORCH_FLAVOUR") == "cpu"  # CPU torch unless --build-arg TORCH_FLAVOUR=cu126 etc.
    assert "download.pytorch.org/whl/${TORCH_FLAVOUR}" in image.args.get("TORCH_INDEX_URL", "")
    for image_path, source in image.copies.items():
        assert source.exists(), f"COPY source {source} missing"
    assert any("pip install ." in run for run in image.runs)  # installs the `redisbus` console script
    assert image.cmd == ["redisbus", "--help"]
    assert image.env.get("PYTHONUNBUFFERED") == "1"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    assert "!redisbus/" in ignore and "!scripts/" in ignore
    for compose_file in ("compose.yaml", "compose.cluster.yaml"):
        spec = yaml.safe_load((DOCKER / compose_file).read_text())
        apps = {n: s for n, s in spec["services"].items() if "build" in s}
        assert {"trainer", "worker", "ops"} <= set(apps)
        for name, svc in apps.items():
            assert svc["build"]["dockerfile"] == "docker/Dockerfile"
            assert svc["command"][0] in ("python", "sh", "redisbus")
        assert spec["services"]["worker"]["deploy"]["replicas"] >= 2


def test_required_passwords_are_refused_when_missing():
    with pytest.raises(ValueError, match="REDIS_ADMIN_PASSWORD"):
        LocalCompose(DOCKER / "compose.yaml", env={})


@pytest.mark.slow
def test_compose_single_node_runs_trainer_workers_and_ops():
    env = _secrets_env()
    compose = LocalCompose(DOCKER / "compose.yaml", env, scale={"worker": 2})
    try:
        assert set(compose.redis_ports) == {"redis"}
        compose.up()
        _check_workers_follow_the_trainer(compose, workers=2)
        # the ACL users of scripts/acl.py are in force: a worker cannot move `latest`, nobody reaches another
        # namespace or CONFIG, and the acl service printed no password
        import redis as redis_py

        acl_output = compose.of("acl")[0].output()
        for role in ("publisher", "worker", "ops"):
            assert f"applied ACL user 'rb-demo-{role}' ({role})" in acl_output, acl_output
        assert not any(env[name] in acl_output for name in env if name.endswith("PASSWORD"))
        port = compose.redis_ports["redis"]
        for role in ("publisher", "worker", "ops"):
            with redis_py.Redis(port=port, username=f"rb-demo-{role}", password=env[f"REDISBUS_{role.upper()}_PASSWORD"]) as user:
                assert int(user.get("rb:{demo}:latest")) >= 3
                for action in (lambda c: c.get("rb:{other}:latest"), lambda c: c.config_get("requirepass"),
                               lambda c: c.keys("*")):
                    with pytest.raises(redis_py.exceptions.NoPermissionError):
                        action(user)
                if role == "worker":
                    with pytest.raises(redis_py.exceptions.NoPermissionError):
                        user.set("rb:{demo}:latest", 999)
        with redis_py.Redis(port=port) as anonymous:
            with pytest.raises(redis_py.exceptions.AuthenticationError):
                anonymous.get("rb:{demo}:latest")
    finally:
        compose.down()


@pytest.mark.slow
def test_compose_cluster_runs_trainer_workers_and_ops():
    env = _secrets_env()
    compose = LocalCompose(DOCKER / "compose.cluster.yaml", env, scale={"worker": 2})
    try:
        assert len(compose.redis_ports) == 6
        compose.up()
        _check_workers_follow_the_trainer(compose, workers=2)
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode("127.0.0.1", p) for p in compose.redis_ports.values()]

        def shape() -> tuple[int, int]:  # CLUSTER SLOTS lists a replica once its link to the master is up
            with RedisCluster(startup_nodes=nodes, password=env["REDIS_ADMIN_PASSWORD"]) as rc:
                return len(rc.get_primaries()), len(rc.get_replicas())

        _wait(lambda: shape() == (3, 3), 30, compose, "3 masters with a replica each")
        with RedisCluster(startup_nodes=nodes, password=env["REDIS_ADMIN_PASSWORD"]) as rc:
            assert int(rc.get("rb:{demo}:latest")) >= 3
    finally:
        compose.down()
