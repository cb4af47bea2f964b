"""``poptune dashboard``: serves the report's views of every run in a storage, live.

The application is `poptune.report.dashboard` (Starlette and uvicorn, ``pip install
'poptune[dashboard]'``); this is the command around it: the storage, the address, the messages.
"""

from __future__ import annotations

import argparse
import sys

from poptune.cli._common import USAGE, CLIError, _open_existing, _storage_url


def cmd_dashboard(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, but got {args.port}.", USAGE)
    if not args.refresh > 0:
        raise CLIError(f"--refresh must be > 0 seconds, but got {args.refresh}.", USAGE)
    from poptune.report.dashboard import _dependencies, allowed_hosts, bind, serve

    _dependencies()  # a missing extra is said before anything is opened
    url = _storage_url(args)
    with _open_existing(url) as store:
        try:
            sock = bind(args.host, args.port)
        except OSError as e:
            raise CLIError(str(e)) from None
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        runs = len(store.list_runs())
        print(
            f"poptune dashboard: {runs} run{'s' if runs != 1 else ''} in {store.display_url}, "
            f"at http://{shown}:{port}/ (Ctrl-C stops)",
            flush=True,
        )
        if host not in ("127.0.0.1", "::1", "localhost"):
            print(
                f"Note: bound to {host}: anyone who can reach this port can read the runs.",
                file=sys.stderr,
                flush=True,
            )
        try:
            # Requests naming another host are refused (DNS rebinding): see the module's doc.
            hosts = allowed_hosts(args.host, host)
            serve(store, sock, refresh=args.refresh, hosts=hosts)
        finally:
            sock.close()
    return 0
