"""The headers on every response the dashboard writes: a page runs only the dashboard's own script, and
a file from a run folder runs none.

- Dashboard pages, JSON, 401s, redirects and `/serve/...` replies get `PAGE_POLICY`: scripts, styles,
  fetches and frames from the dashboard's origin only, no inline script (ui.js is a file; the runs
  table's data is a `type="application/json"` block, which a browser never runs), no plugins, no
  `<base>`, forms post here only, and no other page may frame the dashboard (clickjacking).
- Files from a run folder (its report.html, the compare view built from run folders) set
  `RUN_FILE_POLICY` themselves: `sandbox` gives the document an opaque origin with scripts off, so a
  `<script>` in a copied-in run folder neither runs nor, if it did, could send the dashboard's cookie
  or call `/api/start`. Only inline styles and `data:` images load (strop's reports embed their PNGs);
  the dashboard alone may frame them, and its pages do so in an `<iframe sandbox>` as well.
- Everywhere: `X-Content-Type-Options: nosniff` (a file is what its type says, never sniffed into
  HTML or script) and `Referrer-Policy: no-referrer` (no run id or address leaks to a link's target).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Send

PAGE_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
RUN_FILE_POLICY = (
    "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'self'"
)
RUN_FILE = {"Content-Security-Policy": RUN_FILE_POLICY}  # the headers of a response with a run's file
DEFAULTS = {
    "Content-Security-Policy": PAGE_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def secured(send: Send) -> Send:
    """`send` adding `DEFAULTS` to the response's headers, each unless the response set it itself."""

    async def send_secured(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", []))}
            headers = MutableHeaders(scope=message)
            for name, value in DEFAULTS.items():
                headers.setdefault(name, value)
        await send(message)

    return send_secured
