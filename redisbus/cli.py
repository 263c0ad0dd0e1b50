"""The ``redisbus`` command line: parse, call :class:`redisbus.ops.BusAdmin`, render.

Each command is a thin layer: it parses its options, makes one call to the
operator API, and hands the result to :mod:`redisbus._render` (or prints it
as JSON). Errors become one line on stderr and an exit status from
:mod:`redisbus.exit_codes`: 0 success; 1 verification failed (``verify``
found a bad chunk or manifest, or any command met corrupt data); 2 usage
error (bad option, malformed URL or namespace, unreadable or refused file);
3 not found (unknown version, empty or unknown namespace); 4 cannot connect
to Redis or authentication failed; 5 Redis refused a command (ACL, out of
memory) or a publish failed; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click

from . import __version__, defaults
from . import _render as render
from ._format import describe_event
from .config import ENV_NAMESPACE, ENV_URL
from .errors import RedisBusError, VersionNotFoundError
from .exit_codes import (
    EXIT_CODES,
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_VERIFY_FAILED,
    exit_code_for,
    redact,
)
from .ops import BusAdmin, parse_metadata

__all__ = ["cli", "main"]


class BusCommandError(click.ClickException):
    """A one-line error on stderr with a chosen exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


class _Group(click.Group):
    """Turns every redisbus error into one line on stderr and a documented exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RedisBusError as exc:
            raise _failure(ctx, str(exc), exit_code_for(exc)) from None
        except KeyboardInterrupt:
            raise _failure(ctx, "interrupted", EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader of our output went away (``redisbus watch | head``): stop quietly, as Ctrl-C does,
            # and let the interpreter's last flush go nowhere instead of failing on the closed pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_OK)
        except Exception as exc:
            import redis

            if isinstance(exc, redis.AuthenticationError):
                raise _failure(ctx, "authentication to Redis failed", EXIT_CONNECTION) from None
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise _failure(ctx, f"cannot reach Redis ({type(exc).__name__})", EXIT_CONNECTION) from None
            if isinstance(exc, redis.RedisError):
                raise _failure(ctx, f"Redis error: {exc}", EXIT_REFUSED) from None
            raise


def _failure(ctx: click.Context, message: str, code: int) -> BusCommandError:
    state = ctx.find_object(_State)
    return BusCommandError(redact(message, state.url if state else None), code)


@dataclass
class _State:
    """The group's options, the terminal, and the one :class:`BusAdmin` (connected on first use)."""

    url: str | None
    namespace: str
    timeout: float
    out: render.Terminal
    _admin: BusAdmin | None = None

    def admin(self) -> BusAdmin:
        if self._admin is None:
            self._admin = BusAdmin(self.url, namespace=self.namespace, socket_timeout=self.timeout)
        return self._admin

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()


pass_state = click.make_pass_decorator(_State)


class _VersionType(click.ParamType):
    """A version number (>= 1) or ``latest``."""

    name = "VERSION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value == LATEST:
            return value
        if str(value).lower() == LATEST:
            return LATEST
        try:
            number = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a version number or 'latest'", param, ctx)
        if number < 1:
            self.fail(f"versions start at 1, got {number}", param, ctx)
        return number


LATEST = "latest"
VERSION = _VersionType()


def _v(value: Any) -> int | None:
    return None if value == LATEST or value is None else int(value)


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(f)


def _dead_after_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--dead-after", type=float, default=defaults.DEAD_AFTER_SECONDS, show_default=True,
                        help="Seconds without a heartbeat before a worker counts as dead.")(f)


# --------------------------------------------------------------------------- the group


_EPILOG = "\b\nExit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


@click.group(cls=_Group, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar=ENV_URL,
    metavar="URL",
    help="Redis URL: redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path.sock "
    f"[env {ENV_URL}; default redis://127.0.0.1:6379/0]. Passwords are never printed.",
)
@click.option(
    "--namespace",
    "-n",
    envvar=ENV_NAMESPACE,
    default=defaults.NAMESPACE,
    show_default=True,
    metavar="NAME",
    help=f"Bus namespace [env {ENV_NAMESPACE}].",
)
@click.option(
    "--timeout",
    envvar="REDISBUS_TIMEOUT",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Socket connect/read timeout in seconds [env REDISBUS_TIMEOUT].",
)
@click.option(
    "--progress",
    envvar="REDISBUS_PROGRESS",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Progress bars for long transfers, on stderr (auto: when stderr is a terminal).",
)
@click.version_option(__version__, "--version", "-V", prog_name="redisbus")
@click.pass_context
def cli(ctx: click.Context, url: str | None, namespace: str, timeout: float, progress: str) -> None:
    """Inspect, verify, roll back, pin and clean the weight versions of a redisbus namespace."""
    state = _State(url=url or None, namespace=namespace, timeout=timeout, out=render.Terminal(progress))
    ctx.obj = state
    ctx.call_on_close(state.close)


# --------------------------------------------------------------------------- reading


@cli.command(short_help="Summary: latest, pin, versions, workers, publishers.")
@_json_option
@_dead_after_option
@pass_state
def status(state: _State, as_json: bool, dead_after: float) -> None:
    """One-glance summary: latest, pin, versions kept, workers, publishers."""
    st = state.admin().status(dead_after)
    if as_json:
        return render.print_json(st.to_dict())
    render.status(state.out, st)


@cli.command(short_help="List the committed versions.")
@_json_option
@pass_state
def versions(state: _State, as_json: bool) -> None:
    """Every committed version still in Redis: created, publisher, size, tensors, chunks, latest/pinned."""
    infos = state.admin().list_versions()
    if as_json:
        return render.print_json([v.to_dict() for v in infos])
    render.versions(state.out, infos, state.admin().where())


@cli.command(short_help="Show a version's tensors and metadata (--stats).")
@click.argument("version", type=VERSION, default=LATEST)
@click.option("--stats", is_flag=True, help="Pull the version and show per-tensor min/max/mean/norm and NaN/Inf counts.")
@_json_option
@pass_state
def inspect(state: _State, version: Any, stats: bool, as_json: bool) -> None:
    """Show VERSION's manifest (default latest): tensors with dtype, shape and size, and metadata.

    With --stats the version is pulled and checked chunk by chunk, and statistics
    are computed from its bytes (over finite elements; complex tensors over
    magnitudes). No model is built and nothing is applied anywhere.
    """
    with state.out.progress() as bar:
        info = state.admin().inspect(_v(version), stats=stats, progress=bar)
    if as_json:
        return render.print_json(info.to_dict())
    render.inspection(state.out, info, stats)


@cli.command(short_help="Check every chunk of versions (exit 1 when bad).")
@click.argument("version_list", metavar="[VERSION]...", nargs=-1, type=VERSION)
@click.option("--all", "all_versions", is_flag=True, help="Verify every committed version (and that latest and the pin are committed).")
@_json_option
@pass_state
@click.pass_context
def verify(ctx: click.Context, state: _State, version_list: tuple[Any, ...], all_versions: bool, as_json: bool) -> None:
    """Re-read every chunk of VERSION (default latest) and check it against the manifest.

    Exit status 0 when every version is sound, 1 when any chunk is missing,
    has the wrong size or fails its checksum (each bad chunk is named), or a
    manifest is invalid. With REDISBUS_SIGNING_KEY set, signatures are checked too.
    """
    if all_versions and version_list:
        raise click.UsageError("give versions or --all, not both")
    admin = state.admin()
    wanted = None if all_versions else [admin.resolve_version(_v(v)) for v in (version_list or (LATEST,))]
    with state.out.progress() as bar:
        results = admin.verify(wanted, progress=bar)
    bad = [r for r in results if not r.ok]
    if as_json:
        render.print_json({"ok": not bad, "versions": [r.to_dict() for r in results]})
    else:
        render.verification(state.out, results)
    if bad:
        render.verification_failure(bad)
        ctx.exit(EXIT_VERIFY_FAILED)


@cli.command(short_help="Compare two versions tensor by tensor.")
@click.argument("old", type=VERSION)
@click.argument("new", type=VERSION, default=LATEST)
@click.option("--all", "show_all", is_flag=True, help="List unchanged tensors too.")
@click.option("--exit-code", is_flag=True, help="Exit with status 1 when the versions differ (like git diff --exit-code).")
@_json_option
@pass_state
@click.pass_context
def diff(ctx: click.Context, state: _State, old: Any, new: Any, show_all: bool, exit_code: bool, as_json: bool) -> None:
    """Compare two versions tensor by tensor (NEW defaults to latest).

    For each tensor: changed or not, how many elements changed, the largest
    absolute change and the relative L2 change ||new - old|| / ||old||; keys
    added or removed, and shape or dtype changes.
    """
    with state.out.progress() as bar:
        result = state.admin().diff(_v(old), _v(new), progress=bar)
    if as_json:
        render.print_json({**result.to_dict(), "identical": result.identical})
    else:
        render.diff(state.out, result, show_all)
    if exit_code and not result.identical:
        ctx.exit(1)


@cli.command(short_help="List workers: version, lag, heartbeat, dead.")
@_dead_after_option
@click.option("--prune", is_flag=True, help="Forget the reports of dead workers (a live worker re-reports on its next heartbeat).")
@_json_option
@pass_state
def workers(state: _State, dead_after: float, prune: bool, as_json: bool) -> None:
    """Every worker that reported: applied version, lag behind latest, heartbeat age; dead ones marked."""
    admin = state.admin()
    rows = admin.workers(dead_after)
    latest, pin = admin.head()
    if not rows and latest is None and not admin.exists():
        raise VersionNotFoundError(f"nothing found for {admin.where()}")
    pruned = admin.prune_workers(dead_after) if prune else []
    if as_json:
        return render.print_json({"latest": latest, "pin": pin, "workers": [w.to_dict() for w in rows], "pruned": pruned})
    render.workers(state.out, rows, admin.where(), latest, pin, pruned)


@cli.command(short_help="Follow commits and worker applies live.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--timeout", "duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=0.5, show_default=True, help="Seconds between polls of latest and the worker reports.")
@_dead_after_option
@_json_option
@pass_state
def watch(state: _State, count: int | None, duration: float | None, interval: float, dead_after: float, as_json: bool) -> None:
    """Follow the namespace live: each version as it is committed, each worker as it applies one.

    Also reports pin changes and workers going silent. Runs until Ctrl-C,
    --count N events or --timeout seconds. --json prints one JSON object per line.
    """
    admin = state.admin()
    events = admin.watch(poll_interval=interval, dead_after=dead_after, timeout=duration)  # subscribed from here on
    if not as_json:
        latest, pin = admin.head()
        head = f"latest v{latest}" if latest is not None else "no versions yet"
        click.echo(f"watching {admin.where()} ({head}{f', pinned at v{pin}' if pin is not None else ''}); Ctrl-C to stop")
    seen = 0
    try:
        for event in events:
            click.echo(json.dumps(event, default=str) if as_json else describe_event(event))
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        events.close()


# --------------------------------------------------------------------------- changes


def _metadata_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--metadata", "-m", "extra", multiple=True, metavar="KEY=VALUE", help=help_text)


@cli.command(short_help="Republish an old version as a new version.")
@click.argument("version", type=VERSION)
@_metadata_option("Extra metadata for the new version (VALUE parsed as JSON when it is JSON).")
@_json_option
@pass_state
def rollback(state: _State, version: Any, extra: tuple[str, ...], as_json: bool) -> None:
    """Republish VERSION's weights, bit for bit, as a new higher version.

    Versions only move forward: workers apply the rollback like any other
    version. Its metadata records {"rollback_of": VERSION}. The old version is
    verified first; a corrupt one is refused (exit 1).
    """
    with state.out.progress() as bar:
        result = state.admin().rollback(_v(version), progress=bar, metadata=parse_metadata(extra))
    if as_json:
        render.print_json(result.to_dict())
    else:
        render.rolled_back(state.out, result)
    render.pin_warning(result.pin, result.version)


@cli.command(short_help="Hold workers at a version.")
@click.argument("version", type=VERSION, default=LATEST)
@_json_option
@pass_state
def pin(state: _State, version: Any, as_json: bool) -> None:
    """Hold workers at VERSION (default latest): none applies a newer version until `unpin`.

    Workers below VERSION still move up to it; workers already past it stay
    where they are (a worker never goes backwards: use `rollback` for that).
    The pinned version is never garbage-collected. Publishing goes on.
    """
    result = state.admin().pin(_v(version))
    if as_json:
        return render.print_json(result.to_dict())
    render.pinned(state.out, result)


@cli.command(short_help="Let workers move on to latest again.")
@_json_option
@pass_state
def unpin(state: _State, as_json: bool) -> None:
    """Remove the pin; workers move on to latest at once."""
    result = state.admin().unpin()
    if as_json:
        return render.print_json(result.to_dict())
    render.unpinned(state.out, result)


@cli.command(short_help="Delete old versions and orphan chunks.")
@click.option("--keep", type=click.IntRange(min=1), default=defaults.KEEP_VERSIONS, show_default=True, help="Newest versions kept whole.")
@click.option("--dry-run", is_flag=True, help="Show what would go; change nothing.")
@click.option("--grace", type=click.FloatRange(min=0), default=defaults.GRACE_SECONDS, show_default=True, help="Seconds evicted keys stay readable (a worker mid-pull finishes); 0 deletes at once.")
@click.option("--pending-timeout", type=click.FloatRange(min=0), default=defaults.PENDING_TIMEOUT_SECONDS, show_default=True, help="Age after which chunks of an uncommitted version count as orphans of a crashed publisher.")
@_json_option
@pass_state
def gc(state: _State, keep: int, dry_run: bool, grace: float, pending_timeout: float, as_json: bool) -> None:
    """Delete all but the newest --keep versions, and orphan chunks of crashed publishers.

    Never removes latest or the pinned version. Evicted versions leave the
    index at once and their keys expire after --grace seconds.
    """
    admin = state.admin()
    report = admin.gc(keep, dry_run=dry_run, grace_seconds=grace, pending_timeout=pending_timeout)
    latest, pin = admin.head()
    if as_json:
        return render.print_json({**asdict(report), "latest": latest, "pin": pin, "keep": keep, "grace_seconds": grace})
    render.collected(state.out, report, dry_run, grace)


# --------------------------------------------------------------------------- files


@cli.command(name="export", short_help="Write a version to a safetensors file.")
@click.argument("version", type=VERSION)
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@_json_option
@pass_state
def export_cmd(state: _State, version: Any, path: str, as_json: bool) -> None:
    """Pull VERSION (a number or 'latest'), verify it, and write it to a safetensors file PATH.

    Tensor names are the nested keys joined with '.', as in a state dict; the
    file's metadata records the version, namespace and the version's metadata.
    """
    with state.out.progress() as bar:
        result = state.admin().export(_v(version), path, progress=bar)
    if as_json:
        return render.print_json(result.to_dict())
    render.exported(state.out, result)


@cli.command(name="import", short_help="Publish a safetensors or state-dict file.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--select", metavar="KEY[.KEY...]", help="Publish only the state dict under this entry of the file (e.g. 'model' or 'state_dict').")
@_metadata_option("Metadata for the new version (VALUE parsed as JSON when it is JSON).")
@_json_option
@pass_state
def import_cmd(state: _State, path: str, select: str | None, extra: tuple[str, ...], as_json: bool) -> None:
    """Publish the tensors of PATH as a new version.

    PATH is a .safetensors file (the safe format: raw tensors only), or a
    PyTorch / TorchRL state dict (.pt, .pth, .ckpt, .bin), which is read with
    torch.load(weights_only=True): PyTorch's restricted unpickler, which builds
    only tensors and plain containers and refuses any other Python object.
    Files needing more are refused (exit 2); convert them to safetensors. Only
    import checkpoints from sources you trust.
    """
    result = state.admin().import_file(path, select=select, metadata=extra)
    if as_json:
        render.print_json(result.to_dict())
    else:
        render.imported(state.out, result, path)
    render.pin_warning(result.pin, result.version)


# --------------------------------------------------------------------------- demo


@cli.command(short_help="Run a trainer and workers on the bus.")
@click.option("--workers", "n_workers", type=click.IntRange(min=1), default=2, show_default=True, help="Worker processes.")
@click.option("--versions", "n_versions", type=click.IntRange(min=1), default=5, show_default=True, help="Versions the trainer publishes.")
@click.option("--interval", type=click.FloatRange(min=0), default=0.5, show_default=True, help="Seconds between publishes.")
@click.pass_context
def demo(ctx: click.Context, n_workers: int, n_versions: int, interval: float) -> None:
    """Run a trainer and worker processes exchanging weights, and report each apply.

    Without --url / REDISBUS_URL it starts an embedded redis-server and stops it
    at the end. Namespace 'demo' unless --namespace is given.
    """
    from .demo import run_demo

    state: _State = ctx.obj
    explicit = ctx.parent is not None and ctx.parent.get_parameter_source("namespace") not in (
        click.core.ParameterSource.DEFAULT,
        None,
    )
    import inspect as _inspect

    extra = {"out": sys.stdout} if "out" in _inspect.signature(run_demo).parameters else {}  # click's stdout, now
    code = run_demo(state.url, n_workers, n_versions, interval, state.namespace if explicit else "demo", **extra)
    ctx.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``redisbus``)."""
    cli.main(args=argv, prog_name="redisbus")


if __name__ == "__main__":  # pragma: no cover
    main()
