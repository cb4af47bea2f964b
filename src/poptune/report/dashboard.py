"""The live dashboard: the report's views for every run in a storage, refreshed as runs go on.

A Starlette application (``pip install 'poptune[dashboard]'``: Starlette and uvicorn, imported
only here). It only reads the storage, through one `Storage` object shared by its request
threads (storages are thread-safe, rule 6 of `poptune.storage.base`).

Pages:

* ``/``: every run, with status, progress and best score; the list refreshes itself.
* ``/runs/RUN``: the run's report (`poptune.report.html.report_section`); a small inline
  script asks ``/runs/RUN/version`` every few seconds (a cheap read of the run's record and
  members) and reloads the report from ``/runs/RUN/section`` when it changed. A run whose
  report takes longer than `SLOW_READ` seconds to read (tens of thousands of results) is read
  again at most `READ_SHARE` of the time, so that a dashboard left open does not take a core
  from the training on the same machine: the page then shows a report some seconds old.
* ``/runs/RUN/report.html``: the self-contained report file, as ``poptune report`` writes it.

Nothing is fetched from the network by a page; the pages' script is inline.

Requests whose ``Host`` is not a name the dashboard was bound by are refused (400): bound to
this machine only (the default), only ``127.0.0.1``, ``localhost`` and ``[::1]``, any port.
Otherwise a web page the user opens could rename its own site to 127.0.0.1 (DNS rebinding)
and read the runs through the user's browser. A dashboard bound to every address
(``--host 0.0.0.0``) answers any name: it is open to whoever reaches it anyway.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

from poptune.report.data import _digest
from poptune.report.html import page, report_html, report_section

if TYPE_CHECKING:
    from poptune.report.data import Report
    from poptune.storage.base import Storage

#: Seconds a report may take to read before the dashboard reads that run less often.
SLOW_READ = 0.25

#: The share of the time a dashboard spends reading a run whose reads are slow.
READ_SHARE = 0.1

#: The names of this machine's loopback addresses, as they appear in a ``Host`` header.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})

__all__ = ["LOOPBACK_HOSTS", "allowed_hosts", "create_app", "serve"]

_SCRIPT = """
const REFRESH = %(refresh)d;
const live = document.getElementById('live');
async function tick() {
  const main = document.getElementById(%(target)s);
  try {
    const v = await fetch(%(version)s, {cache: 'no-store'});
    if (!v.ok) throw new Error('HTTP ' + v.status);
    const version = await v.text();
    if (version !== main.dataset.version) {
      const s = await fetch(%(section)s, {cache: 'no-store'});
      if (!s.ok) throw new Error('HTTP ' + s.status);
      main.outerHTML = await s.text();
    }
    live.textContent = 'live: checked ' + new Date().toLocaleTimeString();
    live.className = 'ok';
  } catch (e) {
    live.textContent = 'could not refresh (' + e.message + '); showing the last view';
    live.className = 'error';
  }
  setTimeout(tick, REFRESH);
}
setTimeout(tick, REFRESH);
"""


def _dependencies() -> tuple[Any, Any]:
    try:
        import starlette
        import uvicorn
    except ImportError as e:
        raise ImportError(
            f"The dashboard needs Starlette and uvicorn ({e}); install them with: "
            "pip install 'poptune[dashboard]'"
        ) from None
    return starlette, uvicorn


def _header(store: Storage, run: str | None = None) -> str:
    crumbs = '<a href="/">runs</a>' + (f" / {escape(run)}" if run else "")
    return (
        f"<b>poptune dashboard</b> &middot; {escape(store.display_url)} &middot; {crumbs} "
        '&middot; <span id="live">live</span>'
    )


def _script(refresh: float, target: str, version: str, section: str) -> str:
    return _SCRIPT % {
        "refresh": max(200, round(refresh * 1000)),
        # JSON string literals, with "<" escaped so no value can close the <script> element.
        "target": json.dumps(target).replace("<", "\\u003c"),
        "version": json.dumps(version).replace("<", "\\u003c"),
        "section": json.dumps(section).replace("<", "\\u003c"),
    }


def _runs_section(store: Storage) -> str:
    from poptune.progress import Snapshot, best_member, format_score

    runs = store.list_runs()
    if not runs:
        where = escape(store.display_url)
        body = f"<p>No runs in {where} yet; this page shows them as they start.</p>"
        version = "0"
    else:
        rows = []
        parts = []
        for info in runs:
            members = tuple(store.members(info.name))
            snap = Snapshot(info=info, members=members)
            best = best_member(info, members)
            score = format_score(best.score) if best is not None else "-"
            parts.append(f"{info.name}:{info.status}:{snap.fraction}:{score}")
            rows.append(
                f'<tr data-run="{escape(info.name)}"><td class="l">'
                f'<a href="/runs/{escape(info.name)}">{escape(info.name)}</a></td>'
                f'<td class="l">{escape(info.status)}</td><td>{len(members)}</td>'
                f"<td>{snap.fraction:.0%}</td><td>{escape(score)}</td>"
                f'<td class="l">{escape(str(info.config.get("metric", "score")))} '
                f"({escape(str(info.config.get('mode', 'max')))})</td></tr>"
            )
        body = (
            '<table id="runs"><thead><tr><th class="l">run</th><th class="l">status</th>'
            '<th>members</th><th>progress</th><th>best score</th><th class="l">metric</th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        version = _digest("|".join(parts))
    return (
        f'<main id="runs-list" data-version="{version}"><h1>Runs</h1>{body}'
        '<p class="note">A run\'s page shows its report and follows it while it runs.</p></main>'
    )


@dataclass(frozen=True)
class _Cached:
    """A run's report as last read, when, and how long the read took."""

    report: Report
    done: float
    took: float

    def fresh_until(self) -> float:
        """Until when this report is served even if the run changed (see `READ_SHARE`)."""
        if self.took <= SLOW_READ:
            return self.done
        return self.done + self.took * (1 - READ_SHARE) / READ_SHARE


def allowed_hosts(*bound: str) -> frozenset[str] | None:
    """The ``Host`` names a dashboard bound by the addresses or names ``bound`` answers:
    `LOOPBACK_HOSTS`, and each of ``bound`` that is not a loopback one; None (any name) when
    one of them is a wildcard (``0.0.0.0``, ``::``)."""
    names = set(LOOPBACK_HOSTS)
    for host in bound:
        host = host.strip().lower()
        if host in _WILDCARDS:
            return None
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return frozenset(names)


def _host_name(header: str) -> str | None:
    """The host of a ``Host`` header, lower-case, without its port (an IPv6 address keeps
    its brackets); None when the header is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        host, rest = header[: end + 1], header[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = header.partition(":")
    if not host or (port and not port.isdigit()):
        return None
    return host


class _KnownHostsOnly:
    """ASGI middleware that refuses (400) a request whose ``Host`` is not one of ``hosts``.

    Starlette's TrustedHostMiddleware would do, but older versions of it that this package
    accepts cut ``[::1]:8050`` at its first colon, refusing the IPv6 loopback address.
    """

    def __init__(self, app: Any, hosts: frozenset[str]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
            if _host_name(header) not in self.hosts:
                from starlette.responses import PlainTextResponse

                refused = PlainTextResponse(
                    f"Host {header!r} is not served here: the dashboard answers only "
                    f"{', '.join(sorted(self.hosts))}.",
                    status_code=400,
                )
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    store: Storage,
    *,
    refresh: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    hosts: frozenset[str] | None = LOOPBACK_HOSTS,
) -> Any:
    """The dashboard's Starlette application over ``store`` (which the caller closes).

    Args:
        store: The storage whose runs it shows.
        refresh: Seconds between a page's checks for new results.
        clock: Seconds on a monotonic clock (tests pass their own).
        hosts: The ``Host`` names it answers, without ports (`allowed_hosts`); requests for
            any other get 400. None: any name.
    """
    _dependencies()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from poptune.report import data

    # The last report read of each run, by its version: every open page asks every few
    # seconds, and reading a large run (64 members x 1000 steps) takes a second or two.
    cache: dict[str, _Cached] = {}
    lock = threading.Lock()

    def shown(name: str) -> tuple[str, _Cached | None]:
        """The version a page should show now, and the cached report if it is that one."""
        version = data.run_version(store, name)
        with lock:
            cached = cache.get(name)
        if cached is not None and (
            cached.report.version == version or clock() < cached.fresh_until()
        ):
            return cached.report.version, cached
        return version, None

    def report_of(name: str) -> Report:
        _, cached = shown(name)
        if cached is not None:
            return cached.report
        began = clock()
        report = data.read_report(store, name)
        done = clock()
        with lock:
            cache[name] = _Cached(report, done, done - began)
        return report

    def missing(name: str) -> Response:
        names = [r.name for r in store.list_runs()]
        there = (
            "Runs there: "
            + ", ".join(f'<a href="/runs/{escape(n)}">{escape(n)}</a>' for n in names)
            if names
            else "It holds no runs."
        )
        body = f"<main><h1>No run named {escape(name)!s}</h1><p>{there}</p></main>"
        return HTMLResponse(page("poptune: no such run", body, header=_header(store)), 404)

    def index(request: Request) -> Response:
        script = _script(refresh, "runs-list", "/runs-version", "/runs-section")
        html = page("poptune dashboard", _runs_section(store), header=_header(store), script=script)
        return HTMLResponse(html)

    def runs_section(request: Request) -> Response:
        return HTMLResponse(_runs_section(store))

    def runs_version(request: Request) -> Response:
        section = _runs_section(store)
        start = section.index('data-version="') + len('data-version="')
        return PlainTextResponse(section[start : section.index('"', start)])

    def run_page(request: Request) -> Response:
        name = request.path_params["name"]
        if store.get_run(name) is None:
            return missing(name)
        report = report_of(name)
        base = f"/runs/{name}"
        script = _script(refresh, "report", f"{base}/version", f"{base}/section")
        download = f' &middot; <a href="{escape(base)}/report.html" download>report.html</a>'
        return HTMLResponse(
            page(
                f"poptune: {name}",
                report_section(report),
                header=_header(store, name) + download,
                script=script,
            )
        )

    def run_section(request: Request) -> Response:
        name = request.path_params["name"]
        if store.get_run(name) is None:
            return missing(name)
        return HTMLResponse(report_section(report_of(name)))

    def version(request: Request) -> Response:
        name = request.path_params["name"]
        return PlainTextResponse(shown(name)[0], status_code=200)

    def run_file(request: Request) -> Response:
        name = request.path_params["name"]
        if store.get_run(name) is None:
            return missing(name)
        return HTMLResponse(report_html(report_of(name), source=store.display_url))

    def summary_json(request: Request) -> Response:
        from dataclasses import asdict

        from poptune.export import jsonable

        name = request.path_params["name"]
        if store.get_run(name) is None:
            return missing(name)
        data = jsonable(asdict(report_of(name).summary))
        return Response(json.dumps(data), media_type="application/json")

    async def failed(request: Request, exc: Exception) -> Response:
        # A storage that is briefly unreadable (locked, restarting): the page keeps its view.
        from poptune.cli._common import _scrub

        text = _scrub(f"{type(exc).__name__}: {exc}".splitlines()[0])
        return PlainTextResponse(f"could not read the storage: {text}", status_code=503)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/runs-section", runs_section),
            Route("/runs-version", runs_version),
            Route("/runs/{name}", run_page),
            Route("/runs/{name}/section", run_section),
            Route("/runs/{name}/version", version),
            Route("/runs/{name}/report.html", run_file),
            Route("/runs/{name}/summary.json", summary_json),
        ],
        exception_handlers={Exception: failed},
        middleware=[] if hosts is None else [Middleware(_KnownHostsOnly, hosts=hosts)],
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``.

    Raises:
        OSError: The port is in use or the address cannot be bound; the message says which.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot bind --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise OSError(
                f"port {port} on {host} is in use; pick another with --port (0 picks a free one)"
            ) from None
        raise OSError(f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    store: Storage,
    sock: socket.socket,
    *,
    refresh: float = 2.0,
    hosts: frozenset[str] | None = LOOPBACK_HOSTS,
) -> None:
    """Serves the dashboard on a bound socket until Ctrl-C (or SIGTERM), answering requests
    for the ``Host`` names ``hosts`` (see `create_app`)."""
    _, uvicorn = _dependencies()
    app = create_app(store, refresh=refresh, hosts=hosts)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
