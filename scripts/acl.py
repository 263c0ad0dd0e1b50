#!/usr/bin/env python
"""Print, or apply with ``--apply``, the minimal Redis ACL users of one redisbus namespace.

usage: python scripts/acl.py [--namespace NS] [--publisher-user NAME] [--worker-user NAME]
                             [--redis-version X.Y] [--db N] [--wait] [--apply --url ADMIN_URL]

Two users per namespace (Redis 7.0 or newer: workers need read-only key patterns):

* the **publisher** (trainer): reads and writes the namespace's control keys
  (``rb:{NS}:*``) and chunk keys (``rb:chunk:{NS:*``), publishes on
  ``rb:{NS}:notify``, and runs garbage collection (``SCAN`` for orphan chunks);
* the **worker**: reads the same keys, subscribes to ``rb:{NS}:notify``, and
  writes exactly one key, its heartbeat hash ``rb:{NS}:workers`` (``HSET``);
  it cannot write weights, versions or ``latest``, and cannot publish.

Neither can read, write or subscribe to anything of another namespace. Each
user may run only the commands its role sends (see ``COMMANDS``), including the
connection set-up redis-py does (``CLIENT SETNAME``,
``CLIENT SETINFO`` on Redis >= 7.2, ``SELECT`` when ``--db`` is not 0) and its
health checks (``PING``). ``CONFIG GET`` is deliberately left out: it would
also reveal ``requirepass``; the publisher then keeps its configured
``chunk_size`` (keep it under the server's ``proto-max-bulk-len``).

Printed lines are ``ACL SETUSER`` commands, quoted for a shell
(``redis-cli -u "$ADMIN_URL" ACL SETUSER ...``) or for ``redis-cli``'s prompt.
Passwords come from ``REDISBUS_PUBLISHER_PASSWORD`` and
``REDISBUS_WORKER_PASSWORD``; printed rules carry only their SHA-256
(``#<hex>``), and a user printed without one cannot log in until a password is
added (``ACL SETUSER NAME '>password'``). ``--apply`` runs the rules against
``--url`` (an admin connection; ``REDISBUS_ADMIN_URL``), with the server's
version deciding ``CLIENT SETINFO``. Passwords are never printed.

Examples:
    python scripts/acl.py --namespace ppo-run-7
    REDISBUS_PUBLISHER_PASSWORD=... REDISBUS_WORKER_PASSWORD=... \\
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

ROLES = ("publisher", "worker")
ENV_ADMIN_URL = "REDISBUS_ADMIN_URL"
ENV_PASSWORD = {"publisher": "REDISBUS_PUBLISHER_PASSWORD", "worker": "REDISBUS_WORKER_PASSWORD"}

#: What every redisbus connection sends after its ``HELLO 3 AUTH`` (which needs no permission):
#: its client name and health checks.
CONNECTION = ("ping", "client|setname")
#: The commands of each role, and why.
COMMANDS: dict[str, tuple[str, ...]] = {
    "publisher": (
        "evalsha", "script|load",  # the ALLOCATE and COMMIT scripts (loaded once per connection's server)
        "incr", "zadd", "zrem", "get", "set", "publish",  # run inside those scripts (ACLs apply there too)
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
}


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split(".")[:2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a Redis version like 7.2, got {text!r}") from None
    return major, minor


def rules(
    namespace: str,
    role: str,
    *,
    redis_version: tuple[int, int] = (7, 2),
    db: int = 0,
    wait: bool = False,
) -> list[str]:
    """The ACL rule tokens of ``role`` for ``namespace`` (what follows ``ACL SETUSER name``).

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
    if role == "publisher":
        tokens += [f"~{keys.control_pattern}", f"~{keys.chunk_pattern}"]
    else:
        tokens += [f"%R~{keys.control_pattern}", f"%R~{keys.chunk_pattern}", f"%RW~{keys.workers}"]
    tokens.append(f"&{keys.notify}")
    commands = list(CONNECTION)
    if redis_version >= (7, 2):
        commands.append("client|setinfo")  # redis-py names its library at connect (ignored if refused)
    if db:
        commands.append("select")
    commands += COMMANDS[role]
    if wait and role == "publisher":
        commands.append("wait")  # publishing to read replicas with wait_replicas
    tokens += [f"+{command}" for command in commands]
    return tokens


def user_name(namespace: str, role: str) -> str:
    """Default user name of ``role`` in ``namespace``: ``rb-NS-publisher`` / ``rb-NS-worker``."""
    return f"rb-{namespace}-{role}"


def setuser_lines(
    namespace: str, users: dict[str, str], passwords: dict[str, str] | None = None, **options: object
) -> list[str]:
    """``ACL SETUSER`` lines (shell-quoted) with a comment per role.

    A role whose password is given gets it as its SHA-256 (``#<hex>``, what
    ``ACL LIST`` shows too); the password itself is never part of the output.
    """
    what = {
        "publisher": "publisher (trainer): read/write the namespace's keys, publish notices, garbage-collect",
        "worker": "worker: read the namespace's keys, subscribe to notices, write only its heartbeat (HSET workers)",
    }
    passwords = passwords or {}
    lines = [f"# redisbus ACL users of namespace {namespace!r} (Redis >= 7.0)."]
    if not all(passwords.get(role) for role in ROLES):
        lines.append(
            "# A user printed without '#<sha256>' has no password yet: add one with ACL SETUSER <name> '>password' "
            f"(or set {' / '.join(ENV_PASSWORD.values())}); until then it cannot log in."
        )
    for role in ROLES:
        tokens = rules(namespace, role, **options)  # type: ignore[arg-type]
        if passwords.get(role):
            tokens.append("#" + hashlib.sha256(passwords[role].encode()).hexdigest())
        lines.append(f"# {what[role]}")
        lines.append(shlex.join(["ACL", "SETUSER", users[role], *tokens]))
    return lines


def apply(url: str, namespace: str, users: dict[str, str], passwords: dict[str, str], **options: object) -> dict[str, str]:
    """Create or reset both users on the server at ``url`` (an admin connection). Returns role -> user name.

    The rules fit the server's version unless ``redis_version`` is given.
    """
    import redis

    from redisbus.config import BusConfig
    from redisbus.errors import ConfigError
    from redisbus.transport import translate_errors

    client = BusConfig.from_url(url).client()
    try:
        with translate_errors("applying the ACL users", client):
            if "redis_version" not in options:
                server = str(client.info("server").get("redis_version", "7.2"))
                options["redis_version"] = _version(server)
            for role in ROLES:
                tokens = rules(namespace, role, **options)  # type: ignore[arg-type]
                client.execute_command("ACL", "SETUSER", users[role], *tokens, f">{passwords[role]}")
    except redis.RedisError as exc:  # anything translate_errors let through
        raise ConfigError(f"applying the ACL users failed: {type(exc).__name__}") from None
    finally:
        client.close()
    return users


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/acl.py",
        description="Print (or --apply) the minimal Redis ACL users of a redisbus publisher and worker.",
        epilog="Passwords for --apply come from REDISBUS_PUBLISHER_PASSWORD and REDISBUS_WORKER_PASSWORD; "
        "they are never printed.",
    )
    parser.add_argument("--namespace", default=os.environ.get("REDISBUS_NAMESPACE", "default"),
                        help="bus namespace (default: $REDISBUS_NAMESPACE or 'default')")
    parser.add_argument("--publisher-user", help="publisher user name (default: rb-NS-publisher)")
    parser.add_argument("--worker-user", help="worker user name (default: rb-NS-worker)")
    parser.add_argument("--redis-version", type=_version, default=None,
                        help="server version the printed rules are for (default 7.2; --apply asks the server)")
    parser.add_argument("--db", type=int, default=0, help="database number the users connect to (not 0 adds SELECT)")
    parser.add_argument("--wait", action="store_true", help="the publisher WAITs for read replicas (wait_replicas)")
    parser.add_argument("--apply", action="store_true", help="create/reset the users on --url instead of printing")
    parser.add_argument("--url", default=os.environ.get(ENV_ADMIN_URL),
                        help=f"admin Redis URL for --apply (default: ${ENV_ADMIN_URL})")
    args = parser.parse_args(argv)
    users = {
        "publisher": args.publisher_user or user_name(args.namespace, "publisher"),
        "worker": args.worker_user or user_name(args.namespace, "worker"),
    }
    from redisbus.errors import ConfigError

    options: dict[str, object] = {"db": args.db, "wait": args.wait}
    if args.redis_version is not None:
        options["redis_version"] = args.redis_version
    try:
        passwords = {role: os.environ.get(ENV_PASSWORD[role], "") for role in ROLES}
        if not args.apply:
            print("\n".join(setuser_lines(args.namespace, users, passwords, **options)))
            return 0
        if not args.url:
            parser.error(f"--apply needs --url or ${ENV_ADMIN_URL}")
        missing = [ENV_PASSWORD[role] for role in ROLES if not passwords[role]]
        if missing:
            parser.error(f"--apply needs the users' passwords in {' and '.join(missing)}")
        apply(args.url, args.namespace, users, passwords, **options)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # BusConnectionError, RedisCommandError: already secret-free messages
        print(f"error: {exc}", file=sys.stderr)
        return 4
    for role in ROLES:
        print(f"applied ACL user {users[role]!r} ({role}) for namespace {args.namespace!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
