"""The token check in front of the whole dashboard, and `/serve/RUN/v1/...` routed to a run's own
OpenAI-compatible app.

Every request carries the token: `?token=` once (answered with a cookie and a redirect that drops it
from the address bar), then the cookie, or an `X-Strop-Token` header; anything else gets 401. The
cookie is HttpOnly and SameSite=Strict, so another site's page cannot make the browser send it.
Every response, the 401s and redirects included, leaves with headers.py's security headers.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from strop.core.errors import StropError
from strop.ui import runs
from strop.ui.headers import secured
from strop.ui.playground import Playground


class Guard:
    """ASGI: the token check in front of everything, and `/serve/RUN/v1/...` routed to the run's own
    OpenAI-compatible app."""

    def __init__(self, app: ASGIApp, token: str, cookie: str, root: Path, playground: Playground):
        self.app, self.token, self.cookie, self.root, self.playground = app, token, cookie, root, playground

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets here
        send = secured(send)
        query = parse_qs(scope.get("query_string", b"").decode())
        given = (query.get("token") or [""])[0]
        if given and self._good(given):
            rest = urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs])
            path = "/" + scope["path"].lstrip("/")  # `//host/...` would send the browser to another host
            target = path + (f"?{rest}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if not (self._good(headers.get("x-strop-token", "")) or self._good(_cookie(headers, self.cookie))):
            message = "missing or wrong token: open the address `strop ui` printed (it carries ?token=...)"
            await PlainTextResponse(message, status_code=401)(scope, receive, send)
            return
        if scope["path"].startswith("/serve/"):
            await self._serve(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _good(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid, sep, sub = scope["path"][len("/serve/") :].partition("/v1/")
        try:
            d = runs.resolve(self.root, rid)
            if not sep:
                raise StropError(f"{scope['path']}: expected /serve/RUN/v1/...")
            how, loaded = await asyncio.to_thread(self.playground.load, d)
            if how != "chat":
                raise StropError(f"{rid}: a {how} run; it does not chat")
        except StropError as e:
            body = {
                "error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}
            }
            await JSONResponse(body, status_code=404)(scope, receive, send)
            return
        prefix = scope["path"][: len(scope["path"]) - len(sub) - len("/v1/")]
        await loaded[0]({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)


def _cookie(headers: dict[str, str], name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""
