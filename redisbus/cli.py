"""The ``redisbus`` command line: parse, call :mod:`redisbus.ops`, render.

Exit status: 0 success; 1 verification failed (``verify`` found a bad chunk
or manifest, or any command met corrupt data); 2 usage error (bad option,
malformed URL or namespace, unreadable or refused file); 3 not found
(unknown version, empty or unknown namespace); 4 cannot connect to Redis
or authentication failed; 5 Redis refused a command (ACL, out of memory)
or a publish failed; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import click

from . import __version__, defaults
from .config import ENV_NAMESPACE, ENV_URL
from .errors import (
    BusConnectionError,
    ConfigError,
    CorruptBlobError,
    ManifestError,
    PublishError,
    RedisBusError,
    RedisCommandError,
    SchemaMismatchError,
    SignatureError,
    VersionNotFoundError,
)

__all__ = ["EXIT_CODES", "cli", "exit_code_for", "main", "redact"]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONNECTION = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130

#: Exit status -> meaning (documented in ``--help`` and docs/cli.md).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_VERIFY_FAILED: "verification failed: a bad chunk, manifest or signature",
    EXIT_USAGE: "usage error: bad option, URL, namespace or file",
    EXIT_NOT_FOUND: "not found: unknown version, or nothing in the namespace",
    EXIT_CONNECTION: "cannot reach Redis, or authentication failed",
    EXIT_REFUSED: "Redis refused a command (ACL, out of memory), or a publish failed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

_BY_CLASS: list[tuple[type[BaseException], int]] = [
    (ConfigError, EXIT_USAGE),
    (VersionNotFoundError, EXIT_NOT_FOUND),
    (BusConnectionError, EXIT_CONNECTION),
    (RedisCommandError, EXIT_REFUSED),
    (ManifestError, EXIT_VERIFY_FAILED),
    (CorruptBlobError, EXIT_VERIFY_FAILED),
    (SignatureError, EXIT_VERIFY_FAILED),
    (SchemaMismatchError, EXIT_VERIFY_FAILED),
]


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an error (looking through ``PublishError`` to its cause)."""
    from .ops import FileFormatError

    seen = exc
    while seen is not None:
        if isinstance(seen, FileFormatError):
            return EXIT_USAGE
        for kind, code in _BY_CLASS:
            if isinstance(seen, kind):
                return code
        if not isinstance(seen, PublishError):
            break
        seen = seen.__cause__  # type: ignore[assignment]
    return EXIT_REFUSED


def _secrets(url: str | None) -> list[str]:
    """Every string in ``url`` that may be a password, even in a malformed URL."""
    if not url:
        return []
    found = {url} if "@" in url else set()
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = url.split("://", 1)[-1].split("/", 1)[0]
    auth = netloc.rpartition("@")[0] if "@" in netloc else netloc
    if ":" in auth:
        secret = auth.split(":", 1)[1]
        found.update({secret, unquote(secret)})
    return [s for s in found if s and not s.isdigit()]


def redact(text: str, url: str | None) -> str:
    """``text`` with anything from ``url`` that may be a password replaced by ``***``."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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
    url: str | None
    namespace: str
    timeout: float
    progress: str
    _admin: Any = None
    _console: Any = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def admin(self) -> Any:
        if self._admin is None:
            from .ops import BusAdmin

            self._admin = BusAdmin(self.url, namespace=self.namespace, socket_timeout=self.timeout)
        return self._admin

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
            self._console = Console(file=sys.stdout, width=width, highlight=False, soft_wrap=False)
        return self._console

    def print(self, renderable: Any) -> None:
        """Print rich markup or a table on stdout, without trailing blanks on any line."""
        with self.console.capture() as captured:
            self.console.print(renderable)
        for line in captured.get().splitlines():
            click.echo(line.rstrip())

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


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------- formatting


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _compact(data: Any, limit: int = 60) -> str:
    if not data:
        return ""
    text = json.dumps(data, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _who(publisher: dict[str, Any]) -> str:
    return str(publisher.get("id") or (f"{publisher.get('host')}:{publisher.get('pid')}" if publisher else "-"))


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.4g}"


def _table(title: str | None = None) -> Any:
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def _add_rows(table: Any, rows: list[list[str]], flexible: int, width: int) -> None:
    """Add ``rows``; when ``width`` is too narrow only column ``flexible`` is shortened (with an ellipsis)."""
    from rich.text import Text

    for row in rows:
        table.add_row(*row)
    fixed = 0
    for i, column in enumerate(table.columns):
        if i != flexible:
            column.min_width = max([Text.from_markup(r[i]).cell_len for r in rows] + [len(str(column.header))])
            fixed += column.min_width
    table.columns[flexible].max_width = max(4, width - fixed - 3 * (len(table.columns) - 1))


@contextmanager
def _progress(state: _State) -> Iterator[Any]:
    """A rich progress bar on stderr for long transfers (when stderr is a terminal, or ``--progress always``)."""
    from rich.console import Console

    console = Console(file=sys.stderr, force_terminal=True if state.progress == "always" else None)
    if state.progress == "never" or (state.progress == "auto" and not console.is_terminal):
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=state.progress == "auto",
    )

    class _Hook:
        task: Any = None

        def start(self, description: str, total: int) -> None:
            self.task = bar.add_task(description, total=max(total, 1) if total else 0)

        def advance(self, amount: int) -> None:
            if self.task is not None:
                bar.advance(self.task, amount)

    with bar:
        yield _Hook()


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
    state = _State(url=url or None, namespace=namespace, timeout=timeout, progress=progress)
    ctx.obj = state
    ctx.call_on_close(state.close)


# --------------------------------------------------------------------------- listings


@cli.command(short_help="Summary: latest, pin, versions, workers, publishers.")
@_json_option
@click.option("--dead-after", type=float, default=defaults.DEAD_AFTER_SECONDS, show_default=True, help="Seconds without a heartbeat before a worker counts as dead.")
@pass_state
def status(state: _State, as_json: bool, dead_after: float) -> None:
    """One-glance summary: latest, pin, versions kept, workers, publishers."""
    st = state.admin().status(dead_after)
    if as_json:
        return _print_json(st.to_dict())
    out = state
    out.print(f"namespace   {st.namespace}  ({st.url})")
    out.print(f"latest      {'v' + str(st.latest) if st.latest is not None else '-'}")
    out.print(f"pin         {'v' + str(st.pin) + '  (workers held at or below it)' if st.pin is not None else 'none'}")
    kept = ", ".join(f"v{v}" for v in st.versions) or "none"
    out.print(f"versions    {len(st.versions)} kept ({kept}), {_size(st.stored_bytes)}")
    out.print(
        f"workers     {st.workers} reporting: {st.workers_current} current, {st.workers_lagging} behind, {st.workers_dead} dead"
    )
    for p in st.publishers:
        out.print(f"publisher   {p.publisher_id}  last v{p.version}, {_age(p.age)} ago")
    recent = [p for p in st.publishers if p.age < 600 and not p.publisher_id.startswith("redisbus-cli@")]
    if len({p.publisher_id for p in recent}) > 1:
        click.echo(f"warning: {len(recent)} publishers wrote to this namespace in the last 10 minutes", err=True)


@cli.command(short_help="List the committed versions.")
@_json_option
@pass_state
def versions(state: _State, as_json: bool) -> None:
    """Every committed version still in Redis: created, publisher, size, tensors, chunks, latest/pinned."""
    infos = state.admin().list_versions()
    if as_json:
        return _print_json([v.to_dict() for v in infos])
    table = _table(f"versions of {state.admin().where()}")
    for name, justify in (("version", "right"), ("state", "left"), ("created", "left"), ("publisher", "left"),
                          ("size", "right"), ("tensors", "right"), ("chunks", "right"), ("metadata", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # one line per version; `inspect` shows all metadata
    rows = []
    for v in infos:
        flags = [f for f, on in (("latest", v.latest), ("pinned", v.pinned)) if on]
        if v.error:
            flags.append("[red]BAD MANIFEST[/red]")
        elif not v.complete:
            flags.append("[red]INCOMPLETE[/red]")
        if v.expires_in is not None:
            flags.append(f"fading {_age(v.expires_in)}")
        chunks = f"{v.chunks_present}/{v.chunk_count}"
        rows.append([
            str(v.version),
            ", ".join(flags),
            _when(v.created),
            _who(v.publisher) if not v.error else (v.error or ""),
            _size(v.total_bytes),
            str(v.tensor_count),
            chunks if v.complete else f"[red]{chunks}[/red]",
            _compact(v.metadata),
        ])
    _add_rows(table, rows, flexible=7, width=state.console.width)
    state.print(table)


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
    with _progress(state) as bar:
        info = state.admin().inspect(_v(version), stats=stats, progress=bar)
    if as_json:
        return _print_json(info.to_dict())
    out = state
    marks = [m for m, on in (("latest", info.version == info.latest), ("pinned", info.version == info.pin)) if on]
    out.print(f"version    {info.version}{'  (' + ', '.join(marks) + ')' if marks else ''}")
    out.print(f"created    {_when(info.created)}  ({_age(time.time() - info.created)} ago)")
    out.print(f"publisher  {_who(info.publisher)}")
    out.print(f"size       {_size(info.total_bytes)} in {info.chunk_count} chunks of {_size(info.chunk_size)}"
              f"{', signed' if info.signed else ''}")
    out.print(f"metadata   {json.dumps(info.metadata, default=str) if info.metadata else '{}'}")
    table = _table()
    for name in ("tensor", "dtype", "shape", "size"):
        table.add_column(name, justify="right" if name == "size" else "left", no_wrap=True)
    if stats:
        for name in ("min", "max", "mean", "norm", "nan", "inf"):
            table.add_column(name, justify="right", no_wrap=True)
    for t in info.tensors:
        row = [t.key, t.dtype, str(tuple(t.shape)), _size(t.nbytes)]
        if t.stats is not None:
            s = t.stats
            row += [_num(s.min), _num(s.max), _num(s.mean), _num(s.norm),
                    f"[red]{s.nan}[/red]" if s.nan else "0", f"[red]{s.inf}[/red]" if s.inf else "0"]
        table.add_row(*row)
    out.print(table)


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
    with _progress(state) as bar:
        results = admin.verify(wanted, progress=bar)
    bad = [r for r in results if not r.ok]
    if as_json:
        _print_json({"ok": not bad, "versions": [r.to_dict() for r in results]})
    else:
        out = state
        for r in results:
            if r.ok:
                sig = f", signature {r.signature}" if r.signature != "absent" else ""
                out.print(f"v{r.version}: [green]OK[/green]  {r.chunks_ok}/{r.chunk_count} chunks, {_size(r.total_bytes)}{sig}")
                continue
            out.print(f"v{r.version}: [red]FAILED[/red]  {r.chunks_ok}/{r.chunk_count} chunks sound")
            for p in r.problems:
                where = f"chunk {p.chunk}" if p.chunk is not None else "manifest"
                out.print(f"  {where} ({p.key}): {p.problem}")
    if bad:
        summary = "; ".join(
            f"v{r.version}: " + (f"bad chunks {', '.join(map(str, r.bad_chunks))}" if r.bad_chunks else r.problems[0].problem)
            for r in bad
        )
        click.echo(f"Error: verification failed: {summary}", err=True)
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
    with _progress(state) as bar:
        result = state.admin().diff(_v(old), _v(new), progress=bar)
    if as_json:
        _print_json({**result.to_dict(), "identical": result.identical})
    else:
        counts = {c: result.count(c) for c in ("changed", "unchanged", "added", "removed", "shape", "dtype")}
        state.print(
            f"v{result.old} -> v{result.new}: {counts['changed']} changed, {counts['unchanged']} unchanged, "
            f"{counts['added']} added, {counts['removed']} removed, {counts['shape']} shape changes, "
            f"{counts['dtype']} dtype changes"
        )
        rows = [t for t in result.tensors if show_all or t.change != "unchanged"]
        if rows:
            table = _table()
            for name in ("tensor", "change", "dtype", "shape", "elements changed", "max |Δ|", "rel L2"):
                table.add_column(name, justify="right" if name in ("elements changed", "max |Δ|", "rel L2") else "left", no_wrap=True)
            for t in rows:
                dtype = t.old_dtype if t.old_dtype == t.new_dtype else f"{t.old_dtype or '-'} -> {t.new_dtype or '-'}"
                shape = (str(tuple(t.old_shape)) if t.old_shape == t.new_shape
                         else f"{tuple(t.old_shape) if t.old_shape is not None else '-'} -> "
                              f"{tuple(t.new_shape) if t.new_shape is not None else '-'}")
                table.add_row(t.key, t.change, dtype, shape,
                              "-" if t.elements_changed is None else str(t.elements_changed),
                              _num(t.max_abs), _num(t.rel_l2))
            state.print(table)
    if exit_code and not result.identical:
        ctx.exit(1)


@cli.command(short_help="List workers: version, lag, heartbeat, dead.")
@click.option("--dead-after", type=float, default=defaults.DEAD_AFTER_SECONDS, show_default=True, help="Seconds without a heartbeat before a worker counts as dead.")
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
        return _print_json({"latest": latest, "pin": pin, "workers": [w.to_dict() for w in rows], "pruned": pruned})
    head = f"latest v{latest}" if latest is not None else "no versions"
    if pin is not None:
        head += f", pinned at v{pin}"
    if not rows:
        state.print(f"no worker has reported in {admin.where()} ({head})")
        return
    table = _table(f"workers of {admin.where()} ({head})")
    for name in ("worker", "host", "pid", "version", "lag", "heartbeat", "applied", "errors", "state"):
        table.add_column(name, justify="right" if name in ("pid", "version", "lag", "errors") else "left", no_wrap=True)
    now = time.time()
    colors = {"dead": "red", "lagging": "yellow", "pinned": "cyan", "waiting": "yellow", "current": "green"}
    for w in rows:
        table.add_row(
            w.worker_id,
            w.host,
            str(w.pid),
            "-" if w.version is None else str(w.version),
            "-" if w.lag is None else str(w.lag),
            f"{_age(w.heartbeat_age)} ago",
            f"{_age(now - w.applied_at)} ago" if w.applied_at else "-",
            str(w.errors),
            f"[{colors[w.state]}]{w.state.upper() if w.dead else w.state}[/{colors[w.state]}]",
        )
    state.print(table)
    if pruned:
        state.print(f"pruned {len(pruned)} dead worker(s): {', '.join(pruned)}")


@cli.command(short_help="Follow commits and worker applies live.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--timeout", "duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=0.5, show_default=True, help="Seconds between polls of latest and the worker reports.")
@click.option("--dead-after", type=float, default=defaults.DEAD_AFTER_SECONDS, show_default=True, help="Seconds without a heartbeat before a worker counts as dead.")
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
            if as_json:
                click.echo(json.dumps(event, default=str))
            else:
                click.echo(_describe_event(event))
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        events.close()


def _describe_event(e: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
    kind = e["event"]
    if kind == "version":
        if "error" in e:
            return f"{stamp}  v{e['version']} committed ({e['error']})"
        meta = f"  {_compact(e.get('metadata'))}" if e.get("metadata") else ""
        return (f"{stamp}  v{e['version']} committed  ({_size(e['total_bytes'])}, {_n(e['tensors'], 'tensor')}, "
                f"by {_who(e.get('publisher') or {})}){meta}")
    if kind == "applied":
        was = f"was v{e['previous']}" if e.get("previous") is not None else "first"
        lag = f", {e['lag']} behind" if e.get("lag") else ""
        return f"{stamp}  {e['worker']} applied v{e['version']} ({was}{lag})"
    if kind == "joined":
        return f"{stamp}  {e['worker']} joined ({e['host']} pid {e['pid']}), nothing applied yet"
    if kind == "dead":
        return f"{stamp}  {e['worker']} is DEAD (no heartbeat for {_age(e['heartbeat_age'])})"
    if kind == "alive":
        return f"{stamp}  {e['worker']} is alive again"
    if kind == "pin":
        if e["version"] is None:
            return f"{stamp}  unpinned (was v{e['previous']})"
        return f"{stamp}  pinned at v{e['version']}"
    return f"{stamp}  {json.dumps(e, default=str)}"  # pragma: no cover


# --------------------------------------------------------------------------- changes


def _pin_warning(pin: int | None, version: int) -> None:
    if pin is not None and pin < version:
        click.echo(f"warning: the namespace is pinned at v{pin}; workers will not apply v{version} until `redisbus unpin`", err=True)


@cli.command(short_help="Republish an old version as a new version.")
@click.argument("version", type=VERSION)
@click.option("--metadata", "-m", "extra", multiple=True, metavar="KEY=VALUE", help="Extra metadata for the new version (VALUE parsed as JSON when it is JSON).")
@_json_option
@pass_state
def rollback(state: _State, version: Any, extra: tuple[str, ...], as_json: bool) -> None:
    """Republish VERSION's weights, bit for bit, as a new higher version.

    Versions only move forward: workers apply the rollback like any other
    version. Its metadata records {"rollback_of": VERSION}. The old version is
    verified first; a corrupt one is refused (exit 1).
    """
    from .ops import parse_metadata

    with _progress(state) as bar:
        result = state.admin().rollback(_v(version), progress=bar, metadata=parse_metadata(extra))
    if as_json:
        _print_json(result.to_dict())
    else:
        state.print(
            f"rolled back: the weights of v{result.metadata['rollback_of']} are now v{result.version} "
            f"({_n(result.tensor_count, 'tensor')}, {_size(result.total_bytes)}); workers apply it like any other version"
        )
    _pin_warning(result.pin, result.version)


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
        return _print_json(result.to_dict())
    was = f" (was v{result.previous})" if result.previous is not None and result.previous != result.pin else ""
    state.print(f"pinned at v{result.pin}{was}: workers will not apply anything newer until `redisbus unpin`")
    if result.workers_ahead:
        names = ", ".join(result.workers_ahead[:10]) + (" ..." if len(result.workers_ahead) > 10 else "")
        click.echo(
            f"note: {len(result.workers_ahead)} worker(s) already run a newer version and stay there ({names}); "
            f"`redisbus rollback {result.pin}` moves them back",
            err=True,
        )


@cli.command(short_help="Let workers move on to latest again.")
@_json_option
@pass_state
def unpin(state: _State, as_json: bool) -> None:
    """Remove the pin; workers move on to latest at once."""
    result = state.admin().unpin()
    if as_json:
        return _print_json(result.to_dict())
    if result.previous is None:
        state.print("no pin was set")
    else:
        to = f"; workers move on to v{result.latest}" if result.latest is not None and result.latest != result.previous else ""
        state.print(f"unpinned (was v{result.previous}){to}")


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
        from dataclasses import asdict

        return _print_json({**asdict(report), "latest": latest, "pin": pin, "keep": keep, "grace_seconds": grace})
    verb = "would evict" if dry_run else "evicted"
    out = state
    out.print(f"kept     {', '.join(f'v{v}' for v in report.kept) or 'nothing'}")
    if report.evicted:
        when = "at once" if grace == 0 else f"their keys expire in {_age(grace)}"
        out.print(f"{verb:<8} {', '.join(f'v{v}' for v in report.evicted)} ({when})")
    else:
        out.print(f"{verb:<8} nothing")
    if report.orphan_chunks:
        out.print(f"orphans  {report.orphan_chunks} chunk(s) of uncommitted version(s) "
                  f"{', '.join(f'v{v}' for v in report.orphan_versions)}{' would go' if dry_run else ' removed'}")
    if dry_run:
        out.print("dry run: nothing changed")


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
    with _progress(state) as bar:
        result = state.admin().export(_v(version), path, progress=bar)
    if as_json:
        return _print_json(result.to_dict())
    state.print(
        f"exported v{result.version} to {result.path} ({_n(result.tensor_count, 'tensor')}, {_size(result.total_bytes)})"
    )


@cli.command(name="import", short_help="Publish a safetensors or state-dict file.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--select", metavar="KEY[.KEY...]", help="Publish only the state dict under this entry of the file (e.g. 'model' or 'state_dict').")
@click.option("--metadata", "-m", "extra", multiple=True, metavar="KEY=VALUE", help="Metadata for the new version (VALUE parsed as JSON when it is JSON).")
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
        _print_json(result.to_dict())
    else:
        state.print(
            f"imported {os.path.basename(path)} as v{result.version} ({_n(result.tensor_count, 'tensor')}, {_size(result.total_bytes)})"
        )
    _pin_warning(result.pin, result.version)


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
