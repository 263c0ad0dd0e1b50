"""What the ``redisbus`` commands print: rich tables and lines on stdout, JSON, notes on stderr, progress bars.

Every function takes the records of :mod:`redisbus.records` (or
:class:`~redisbus.retention.GcReport`) and prints them; none talks to Redis.
Lines on stdout never end in blanks; with no terminal, tables are laid out
200 columns wide (or ``$COLUMNS``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from . import _format as fmt
from .progress import Progress
from .records import (
    DiffResult,
    ExportResult,
    Inspection,
    PinResult,
    PublishResult,
    Status,
    VerifyResult,
    VersionInfo,
    WorkerStatus,
)
from .retention import GcReport

__all__ = [
    "Terminal",
    "collected",
    "diff",
    "exported",
    "imported",
    "inspection",
    "pin_warning",
    "pinned",
    "print_json",
    "rolled_back",
    "status",
    "unpinned",
    "verification",
    "verification_failure",
    "versions",
    "workers",
]


class Terminal:
    """Stdout through rich (markup and tables), and progress bars on stderr.

    Args:
        progress: ``auto`` (bars when stderr is a terminal), ``always`` or ``never``.
    """

    def __init__(self, progress: str) -> None:
        self.progress_mode = progress
        self._console: Any = None

    @property
    def console(self) -> Any:
        """The rich console on stdout (200 columns wide when stdout is no terminal and ``$COLUMNS`` is unset)."""
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

    @contextmanager
    def progress(self) -> Iterator[Progress | None]:
        """A rich progress bar on stderr for long transfers (when stderr is a terminal, or ``--progress always``)."""
        from rich.console import Console

        console = Console(file=sys.stderr, force_terminal=True if self.progress_mode == "always" else None)
        if self.progress_mode == "never" or (self.progress_mode == "auto" and not console.is_terminal):
            yield None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=self.progress_mode == "auto",
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


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (what ``--json`` prints)."""
    click.echo(json.dumps(data, indent=2, default=str))


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


# --------------------------------------------------------------------------- reading


def status(out: Terminal, st: Status) -> None:
    """The one-glance summary; a warning on stderr when several publishers wrote in the last 10 minutes."""
    out.print(f"namespace   {st.namespace}  ({st.url})")
    out.print(f"latest      {'v' + str(st.latest) if st.latest is not None else '-'}")
    out.print(f"pin         {'v' + str(st.pin) + '  (workers held at or below it)' if st.pin is not None else 'none'}")
    kept = ", ".join(f"v{v}" for v in st.versions) or "none"
    out.print(f"versions    {len(st.versions)} kept ({kept}), {fmt.size(st.stored_bytes)}")
    ahead = f", {st.workers_ahead} ahead of latest" if st.workers_ahead else ""
    out.print(
        f"workers     {st.workers} reporting: {st.workers_current} current, {st.workers_lagging} behind{ahead}, "
        f"{st.workers_dead} dead"
    )
    for p in st.publishers:
        out.print(f"publisher   {p.publisher_id}  last v{p.version}, {fmt.age(p.age)} ago")
    if st.workers_ahead:
        _ahead_note(st.workers_ahead, st.latest)
    recent = [p for p in st.publishers if p.age < 600 and not p.publisher_id.startswith("redisbus-cli@")]
    if len({p.publisher_id for p in recent}) > 1:
        click.echo(f"warning: {len(recent)} publishers wrote to this namespace in the last 10 minutes", err=True)


def _ahead_note(count: int, latest: int | None) -> None:
    """On stderr: workers on a version newer than ``latest`` apply nothing until the versions pass theirs."""
    than = f"than latest v{latest}" if latest is not None else "than any in the namespace"
    click.echo(
        f"note: {count} worker(s) run a version newer {than} (Redis restarted empty?); they apply nothing "
        "until the published versions pass theirs: restart them to take latest now",
        err=True,
    )


def versions(out: Terminal, infos: Sequence[VersionInfo], where: str) -> None:
    """One line per version; only the metadata column is shortened to fit the terminal."""
    table = _table(f"versions of {where}")
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
            flags.append(f"fading {fmt.age(v.expires_in)}")
        chunks = f"{v.chunks_present}/{v.chunk_count}"
        rows.append([
            str(v.version),
            ", ".join(flags),
            fmt.when(v.created),
            fmt.publisher_name(v.publisher) if not v.error else (v.error or ""),
            fmt.size(v.total_bytes),
            str(v.tensor_count),
            chunks if v.complete else f"[red]{chunks}[/red]",
            fmt.compact_json(v.metadata),
        ])
    _add_rows(table, rows, flexible=7, width=out.console.width)
    out.print(table)


def inspection(out: Terminal, info: Inspection, stats: bool) -> None:
    """A version's header lines, then its tensors (with statistics columns when ``stats``)."""
    marks = [m for m, on in (("latest", info.version == info.latest), ("pinned", info.version == info.pin)) if on]
    out.print(f"version    {info.version}{'  (' + ', '.join(marks) + ')' if marks else ''}")
    out.print(f"created    {fmt.when(info.created)}  ({fmt.age(time.time() - info.created)} ago)")
    out.print(f"publisher  {fmt.publisher_name(info.publisher)}")
    out.print(f"size       {fmt.size(info.total_bytes)} in {info.chunk_count} chunks of {fmt.size(info.chunk_size)}"
              f"{', signed' if info.signed else ''}")
    out.print(f"metadata   {json.dumps(info.metadata, default=str) if info.metadata else '{}'}")
    table = _table()
    for name in ("tensor", "dtype", "shape", "size"):
        table.add_column(name, justify="right" if name == "size" else "left", no_wrap=True)
    if stats:
        for name in ("min", "max", "mean", "norm", "nan", "inf"):
            table.add_column(name, justify="right", no_wrap=True)
    for t in info.tensors:
        row = [t.key, t.dtype, str(tuple(t.shape)), fmt.size(t.nbytes)]
        if t.stats is not None:
            s = t.stats
            row += [fmt.number(s.min), fmt.number(s.max), fmt.number(s.mean), fmt.number(s.norm),
                    f"[red]{s.nan}[/red]" if s.nan else "0", f"[red]{s.inf}[/red]" if s.inf else "0"]
        table.add_row(*row)
    out.print(table)


def verification(out: Terminal, results: Sequence[VerifyResult]) -> None:
    """One line per version, and one more per problem of a failed one."""
    for r in results:
        if r.ok:
            sig = f", signature {r.signature}" if r.signature != "absent" else ""
            out.print(f"v{r.version}: [green]OK[/green]  {r.chunks_ok}/{r.chunk_count} chunks, {fmt.size(r.total_bytes)}{sig}")
            continue
        out.print(f"v{r.version}: [red]FAILED[/red]  {r.chunks_ok}/{r.chunk_count} chunks sound")
        for p in r.problems:
            where = f"chunk {p.chunk}" if p.chunk is not None else "manifest"
            out.print(f"  {where} ({p.key}): {p.problem}")


def verification_failure(bad: Sequence[VerifyResult]) -> None:
    """The one-line error on stderr naming the bad chunks (or first problem) of each failed version."""
    summary = "; ".join(
        f"v{r.version}: " + (f"bad chunks {', '.join(map(str, r.bad_chunks))}" if r.bad_chunks else r.problems[0].problem)
        for r in bad
    )
    click.echo(f"Error: verification failed: {summary}", err=True)


def diff(out: Terminal, result: DiffResult, show_all: bool) -> None:
    """Counts by kind of change, then a table of the tensors that changed (all of them with ``show_all``)."""
    counts = {c: result.count(c) for c in ("changed", "unchanged", "added", "removed", "shape", "dtype")}
    out.print(
        f"v{result.old} -> v{result.new}: {counts['changed']} changed, {counts['unchanged']} unchanged, "
        f"{counts['added']} added, {counts['removed']} removed, {counts['shape']} shape changes, "
        f"{counts['dtype']} dtype changes"
    )
    rows = [t for t in result.tensors if show_all or t.change != "unchanged"]
    if not rows:
        return
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
                      fmt.number(t.max_abs), fmt.number(t.rel_l2))
    out.print(table)


def workers(
    out: Terminal, rows: Sequence[WorkerStatus], where: str, latest: int | None, pin: int | None, pruned: Sequence[str]
) -> None:
    """A table of the workers, states in color, and the workers pruned (if any)."""
    head = f"latest v{latest}" if latest is not None else "no versions"
    if pin is not None:
        head += f", pinned at v{pin}"
    if not rows:
        out.print(f"no worker has reported in {where} ({head})")
        return
    table = _table(f"workers of {where} ({head})")
    for name in ("worker", "host", "pid", "version", "lag", "heartbeat", "applied", "errors", "state"):
        table.add_column(name, justify="right" if name in ("pid", "version", "lag", "errors") else "left", no_wrap=True)
    now = time.time()
    colors = {"dead": "red", "lagging": "yellow", "pinned": "cyan", "waiting": "yellow", "ahead": "magenta", "current": "green"}
    for w in rows:
        table.add_row(
            w.worker_id,
            w.host,
            str(w.pid),
            "-" if w.version is None else str(w.version),
            "-" if w.lag is None else str(w.lag),
            f"{fmt.age(w.heartbeat_age)} ago",
            f"{fmt.age(now - w.applied_at)} ago" if w.applied_at else "-",
            str(w.errors),
            f"[{colors[w.state]}]{w.state.upper() if w.dead else w.state}[/{colors[w.state]}]",
        )
    out.print(table)
    ahead = sum(w.state == "ahead" for w in rows)
    if ahead:
        _ahead_note(ahead, latest)
    if pruned:
        out.print(f"pruned {len(pruned)} dead worker(s): {', '.join(pruned)}")


# --------------------------------------------------------------------------- changes


def pin_warning(pin: int | None, version: int) -> None:
    """On stderr: a pin below ``version`` holds workers back from it."""
    if pin is not None and pin < version:
        click.echo(f"warning: the namespace is pinned at v{pin}; workers will not apply v{version} until `redisbus unpin`", err=True)


def rolled_back(out: Terminal, result: PublishResult) -> None:
    """Which old version's weights are now which new version."""
    out.print(
        f"rolled back: the weights of v{result.metadata['rollback_of']} are now v{result.version} "
        f"({fmt.plural(result.tensor_count, 'tensor')}, {fmt.size(result.total_bytes)}); workers apply it like any other version"
    )


def pinned(out: Terminal, result: PinResult) -> None:
    """The pin set, and on stderr the workers already past it."""
    was = f" (was v{result.previous})" if result.previous is not None and result.previous != result.pin else ""
    out.print(f"pinned at v{result.pin}{was}: workers will not apply anything newer until `redisbus unpin`")
    if result.workers_ahead:
        names = ", ".join(result.workers_ahead[:10]) + (" ..." if len(result.workers_ahead) > 10 else "")
        click.echo(
            f"note: {len(result.workers_ahead)} worker(s) already run a newer version and stay there ({names}); "
            f"`redisbus rollback {result.pin}` moves them back",
            err=True,
        )


def unpinned(out: Terminal, result: PinResult) -> None:
    """The pin removed (or that none was set), and where workers move on to."""
    if result.previous is None:
        out.print("no pin was set")
    else:
        to = f"; workers move on to v{result.latest}" if result.latest is not None and result.latest != result.previous else ""
        out.print(f"unpinned (was v{result.previous}){to}")


def collected(out: Terminal, report: GcReport, dry_run: bool, grace: float) -> None:
    """Versions kept and evicted (or that would be), and the orphan chunks found."""
    verb = "would evict" if dry_run else "evicted"
    out.print(f"kept     {', '.join(f'v{v}' for v in report.kept) or 'nothing'}")
    if report.evicted:
        when = "at once" if grace == 0 else f"their keys expire in {fmt.age(grace)}"
        out.print(f"{verb:<8} {', '.join(f'v{v}' for v in report.evicted)} ({when})")
    else:
        out.print(f"{verb:<8} nothing")
    if report.orphan_chunks:
        out.print(f"orphans  {report.orphan_chunks} chunk(s) of uncommitted version(s) "
                  f"{', '.join(f'v{v}' for v in report.orphan_versions)}{' would go' if dry_run else ' removed'}")
    if dry_run:
        out.print("dry run: nothing changed")


def exported(out: Terminal, result: ExportResult) -> None:
    """Which version went to which file."""
    out.print(
        f"exported v{result.version} to {result.path} ({fmt.plural(result.tensor_count, 'tensor')}, {fmt.size(result.total_bytes)})"
    )


def imported(out: Terminal, result: PublishResult, path: str) -> None:
    """Which file became which version."""
    out.print(
        f"imported {os.path.basename(path)} as v{result.version} ({fmt.plural(result.tensor_count, 'tensor')}, "
        f"{fmt.size(result.total_bytes)})"
    )
