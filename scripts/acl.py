#!/usr/bin/env python
"""Print, or create with ``--apply``, the least-privilege Redis ACL users of one redisbus namespace.

usage: scripts/acl.py [-h] [--namespace NS] [--roles ROLE[,ROLE...]] [--publisher-user NAME] [--worker-user NAME]
                      [--ops-user NAME] [--redis-version X.Y] [--db N] [--wait] [--apply] [--url ADMIN_URL]

Three users per namespace (Redis 7.0 or newer: workers need read-only key patterns):

* the **publisher** (trainer): reads and writes the namespace's control keys
  (``rb:{NS}:*``) and chunk keys (``rb:chunk:{NS:*``), publishes on
  ``rb:{NS}:notify`` (from the commit script), and runs garbage collection
  (``SCAN`` for orphan chunks);
* the **worker**: reads the same keys, subscribes to ``rb:{NS}:notify``, and
  writes exactly one key, its heartbeat hash ``rb:{NS}:workers`` (``HSET``);
  it cannot write weights, versions or ``latest``, and cannot publish;
* the **ops** user (operators: every ``redisbus`` CLI command but ``demo``):
  reads and writes the same keys and channel as the publisher, plus what the
  listings, ``verify``, ``watch``, ``pin``/``unpin``, ``workers --prune``,
  ``gc`` and ``rollback``/``import`` (which publish a version) send.

None can read, write or subscribe to anything of another namespace. Each user
may run exactly the commands its role sends (see ``COMMANDS``; the tests count
them on a real server), including the connection set-up redis-py does
(``CLIENT SETNAME``, ``CLIENT SETINFO`` on Redis >= 7.2, ``SELECT`` when
``--db`` is not 0) and its health checks (``PING``). ``CONFIG GET`` is
deliberately left out: it would also reveal ``requirepass``; a publisher
(trainer, ``rollback``, ``import``) then keeps its configured ``chunk_size``
(keep it under the server's ``proto-max-bulk-len``). ``--wait`` adds ``WAIT``
to the publisher and ops users, for read replicas (``wait_replicas``). The
rules are not written for Redis Cluster.

Printed lines are ``ACL SETUSER`` commands, quoted for a shell
(``redis-cli -u "$ADMIN_URL" ACL SETUSER ...``) or for ``redis-cli``'s prompt.
Passwords come from ``REDISBUS_PUBLISHER_PASSWORD``, ``REDISBUS_WORKER_PASSWORD``
and ``REDISBUS_OPS_PASSWORD``; rules carry only their SHA-256 (``#<hex>``,
what ``ACL LIST`` shows too), and a user printed without one cannot log in
until a password is added (``ACL SETUSER NAME '>password'``). ``--apply``
sends exactly those rules (so the password itself never leaves this process)
to ``--url`` (an admin connection; ``REDISBUS_ADMIN_URL``), with the server's
version deciding ``CLIENT SETINFO``; every selected role then needs its
password. Re-running is safe: every rule set starts with ``reset``. ACL users
are not replicated: apply them to every replica too.

Exit status: 0 done; 2 usage error (bad option or namespace, unknown role,
Redis older than 7.0, a password missing for ``--apply``, no ``--url``);
4 Redis unreachable, authentication failed, or ``ACL SETUSER`` refused.

Examples:
    python scripts/acl.py --namespace ppo-run-7
    REDISBUS_PUBLISHER_PASSWORD=... REDISBUS_WORKER_PASSWORD=... REDISBUS_OPS_PASSWORD=... \\
        python scripts/acl.py --namespace ppo-run-7 --apply --url redis://:adminpw@10.0.0.5:6379/0
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROLES = ("publisher", "worker", "ops")
ENV_ADMIN_URL = "REDISBUS_ADMIN_URL"
ENV_PASSWORD = {role: f"REDISBUS_{role.upper()}_PASSWORD" for role in ROLES}

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REDIS = 4

#: What every redisbus connection sends after its ``HELLO 3 AUTH`` (which needs no permission):
#: its client name and health checks.
CONNECTION = ("ping", "client|setname")
#: The commands of each role, and why.
COMMANDS: dict[str, tuple[str, ...]] = {
    "publisher": (
        "evalsha", "script|load",  # the ALLOCATE and COMMIT scripts (loaded once per connection's server)
        "incr", "zadd", "zrem", "get", "set", "publish",  # run inside those scripts (ACLs apply there too)
        "strlen",  # ... COMMIT checks that every chunk is stored whole
        "mget",  # latest + pin
        "hset",  # the publisher report
        "del",  # discarding the chunks of a failed publish; GC with no grace
        "zrange", "pexpire", "pttl", "scan",  # garbage collection (SCAN finds orphan chunks)
    ),
    "worker": (
        "subscribe",  # notices
        "mget",  # latest + pin
        "strlen", "getrange",  # the manifest, size-checked before it is transferred
        "get",  # chunks
        "hset",  # the heartbeat report: the only write, and only to rb:{NS}:workers
    ),
    "ops": (
        "mget",  # latest + pin (every command)
        "zrange",  # the version index (versions, status, verify, pin, gc: also the pending marks)
        "strlen", "getrange",  # manifests, size-checked first; chunk sizes (versions, verify)
        "get",  # chunks (inspect --stats, verify, diff, export, rollback); manifests of evicted versions (gc)
        "pttl",  # expiry of each version (versions); orphan chunks already fading (gc)
        "hgetall",  # worker and publisher reports (status, workers, pin, watch)
        "exists",  # is there anything in this namespace at all (status, workers)
        "subscribe", "zrangebyscore",  # watch: notices, then the versions committed since the last look
        "set", "del", "publish",  # pin / unpin (unpin re-announces latest)
        "hdel",  # workers --prune
        "pexpire", "zrem", "scan",  # gc (DEL with --grace 0; SCAN finds orphan chunks)
        "evalsha", "script|load", "incr", "zadd",  # rollback / import publish a version: the two scripts
        "hset",  # ... and the publisher report of rollback / import
    ),
}
#: What each role is, in one line (printed above its rules).
WHAT = {
    "publisher": "publisher (trainer): read/write the namespace's keys, publish notices, garbage-collect",
    "worker": "worker: read the namespace's keys, subscribe to notices, write only its heartbeat (HSET workers)",
    "ops": "ops (the redisbus CLI): read/write the namespace's keys, watch, pin, prune, gc, rollback, import",
}


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split(".")[:2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a Redis version like 7.2, got {text!r}") from None
    return major, minor


def _roles(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [role for role in chosen if role not in ROLES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown role(s) {', '.join(unknown) or text!r}: expected {','.join(ROLES)}")
    return chosen


def rules(
    namespace: str,
    role: str,
    *,
    redis_version: tuple[int, int] = (7, 2),
    db: int = 0,
    wait: bool = False,
) -> list[str]:
    """The ACL rule tokens of ``role`` for ``namespace`` (what follows ``ACL SETUSER name``), without a password.

    Raises:
        ConfigError: an invalid namespace, an unknown role, or Redis older than 7.0.
    """
    from redisbus.errors import ConfigError  # imported here: importing redisbus imports torch (slow for --help)
    from redisbus.keys import KeySpace

    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if redis_version < (7, 0):
        raise ConfigError("redisbus ACLs need Redis 7.0 or newer (read-only key patterns for workers)")
    keys = KeySpace(namespace)
    tokens = ["reset", "on", "resetkeys", "resetchannels", "-@all"]
    if role == "worker":
        tokens += [f"%R~{keys.control_pattern}", f"%R~{keys.chunk_pattern}", f"%RW~{keys.workers}"]
    else:
        tokens += [f"~{keys.control_pattern}", f"~{keys.chunk_pattern}"]
    tokens.append(f"&{keys.notify}")
    commands = list(CONNECTION)
    if redis_version >= (7, 2):
        commands.append("client|setinfo")  # redis-py names its library at connect (ignored if refused)
    if db:
        commands.append("select")
    commands += COMMANDS[role]
    if wait and role in ("publisher", "ops"):
        commands.append("wait")  # publishing to read replicas with wait_replicas
    tokens += [f"+{command}" for command in commands]
    return tokens


def password_rule(password: str) -> str:
    """``#<sha256 hex>``: the password as ``ACL SETUSER`` takes (and ``ACL LIST`` shows) it, never in clear."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_name(namespace: str, role: str) -> str:
    """Default user name of ``role`` in ``namespace``: ``rb-NS-publisher`` / ``rb-NS-worker`` / ``rb-NS-ops``."""
    return f"rb-{namespace}-{role}"


def setusers(
    namespace: str, users: dict[str, str], passwords: dict[str, str] | None = None, **options: object
) -> dict[str, list[str]]:
    """Role -> the full ``ACL SETUSER`` argument list (user name, rules, ``#<sha256>`` of a password given).

    ``users`` maps each role to create to its user name (and decides the order).
    """
    passwords = passwords or {}
    out = {}
    for role, name in users.items():
        tokens = rules(namespace, role, **options)  # type: ignore[arg-type]
        if passwords.get(role):
            tokens.append(password_rule(passwords[role]))
        out[role] = [name, *tokens]
    return out


def setuser_lines(
    namespace: str, users: dict[str, str], passwords: dict[str, str] | None = None, **options: object
) -> list[str]:
    """``ACL SETUSER`` lines (shell-quoted) with a comment per role; never a password, only its SHA-256."""
    passwords = passwords or {}
    lines = [f"# redisbus ACL users of namespace {namespace!r} (Redis >= 7.0)."]
    if not all(passwords.get(role) for role in users):
        lines.append(
            "# A user printed without '#<sha256>' has no password yet: add one with ACL SETUSER <name> '>password' "
            f"(or set {' / '.join(ENV_PASSWORD[role] for role in users)}); until then it cannot log in."
        )
    for role, args in setusers(namespace, users, passwords, **options).items():
        lines.append(f"# {WHAT[role]}")
        lines.append(shlex.join(["ACL", "SETUSER", *args]))
    return lines


def apply(url: str, namespace: str, users: dict[str, str], passwords: dict[str, str], **options: object) -> dict[str, str]:
    """Create or reset the users of ``users`` on the server at ``url`` (an admin connection). Returns role -> name.

    Sends exactly the rules :func:`setuser_lines` prints (passwords as their
    SHA-256). The rules fit the server's version unless ``redis_version`` is given.

    Raises:
        ConfigError: an invalid namespace, Redis older than 7.0, an unexpected Redis reply.
        BusConnectionError: Redis unreachable or the admin credentials refused.
        RedisCommandError: ``ACL SETUSER`` refused (the URL's user is no admin).
    """
    import redis

    from redisbus.config import BusConfig
    from redisbus.errors import ConfigError
    from redisbus.transport import translate_errors

    client = BusConfig.from_url(url).client(retries=1)
    try:
        with translate_errors("applying the ACL users", client):
            if "redis_version" not in options:
                server = str(client.info("server").get("redis_version", "7.2"))
                options["redis_version"] = _version(server)
            for args in setusers(namespace, users, passwords, **options).values():
                client.execute_command("ACL", "SETUSER", *args)
    except redis.RedisError as exc:  # anything translate_errors let through
        raise ConfigError(f"applying the ACL users failed: {type(exc).__name__}") from None
    finally:
        client.close()
    return users


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/acl.py",
        description="Print (or --apply) the least-privilege Redis ACL users of a redisbus namespace: "
        "publisher, worker and ops (the redisbus CLI).",
        epilog=f"Passwords come from {', '.join(ENV_PASSWORD.values())}; only their SHA-256 is printed or sent. "
        "Exit status: 0 done; 2 usage error (bad option or namespace, Redis < 7.0, missing password or --url); "
        "4 Redis unreachable, authentication failed, or ACL SETUSER refused.",
    )
    parser.add_argument("--namespace", default=os.environ.get("REDISBUS_NAMESPACE", "default"), metavar="NS",
                        help="bus namespace (default: $REDISBUS_NAMESPACE or 'default')")
    parser.add_argument("--roles", type=_roles, default=ROLES, metavar="ROLE[,ROLE...]",
                        help=f"the users to print or create (default: {','.join(ROLES)})")
    for role in ROLES:
        parser.add_argument(f"--{role}-user", metavar="NAME", help=f"{role} user name (default: rb-NS-{role})")
    parser.add_argument("--redis-version", type=_version, default=None, metavar="X.Y",
                        help="server version the printed rules are for (default 7.2; --apply asks the server)")
    parser.add_argument("--db", type=int, default=0, metavar="N", help="database number the users connect to (not 0 adds SELECT)")
    parser.add_argument("--wait", action="store_true",
                        help="publisher and ops WAIT for read replicas (wait_replicas): adds WAIT")
    parser.add_argument("--apply", action="store_true", help="create/reset the users on --url instead of printing")
    parser.add_argument("--url", default=os.environ.get(ENV_ADMIN_URL), metavar="ADMIN_URL",
                        help=f"admin Redis URL for --apply (default: ${ENV_ADMIN_URL})")
    args = parser.parse_args(argv)
    if args.db < 0:
        parser.error(f"--db must be 0 or more, got {args.db}")
    users = {role: getattr(args, f"{role}_user") or user_name(args.namespace, role) for role in args.roles}
    from redisbus.errors import ConfigError

    options: dict[str, object] = {"db": args.db, "wait": args.wait}
    if args.redis_version is not None:
        options["redis_version"] = args.redis_version
    passwords = {role: os.environ.get(ENV_PASSWORD[role], "") for role in users}
    try:
        if not args.apply:
            print("\n".join(setuser_lines(args.namespace, users, passwords, **options)))
            return EXIT_OK
        if not args.url:
            parser.error(f"--apply needs --url or ${ENV_ADMIN_URL}")
        missing = [ENV_PASSWORD[role] for role in users if not passwords[role]]
        if missing:
            parser.error(f"--apply needs the users' passwords in {' and '.join(missing)}")
        apply(args.url, args.namespace, users, passwords, **options)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # BusConnectionError, RedisCommandError: already secret-free messages
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REDIS
    for role, name in users.items():
        print(f"applied ACL user {name!r} ({role}) for namespace {args.namespace!r}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
