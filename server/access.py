"""Who may talk to `vmr serve`: the Host check (against DNS rebinding) and access tokens (a server others reach).

Host: a page on any web site can point a name it controls at 127.0.0.1 (DNS rebinding) and read what a local
server answers. So only requests whose Host header names this server are answered: localhost, 127.0.0.1, ::1,
the address it is bound to (for 0.0.0.0 / ::, this machine's name and addresses), and names given with
--allow-host (a reverse proxy's public name); any other Host gets 400.

Tokens: {secret: name}. With tokens, every request but the page itself (/, /static/, the favicon) and its login
(POST /api/login) needs one, as `Authorization: Bearer SECRET` or the cookie that login sets (the page's video
and image elements cannot send headers); without it 401. The token's name is the request's user
(scope["vmr_user"]): labels record it as their author. `vmr serve` requires tokens when bound to anything but
localhost, and makes one when none is given.
"""
from __future__ import annotations

import hmac
import secrets
import socket

from fastapi.responses import JSONResponse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
COOKIE = "vmr_token"
COOKIE_SECONDS = 30 * 24 * 3600
OPEN_PATHS = ("/", "/favicon.ico", "/api/login")  # plus everything under /static/: the page asks for the token
DEFAULT_NAME = "user"  # a token given without NAME=


def allowed_hosts(bind_host: str, extra: tuple[str, ...] | list[str] = ()) -> set[str]:
    """Host names (lower case, no port, IPv6 without brackets) this server answers to."""
    names = set(LOOPBACK) | {h.strip().lower().strip("[]") for h in extra if h.strip()}
    bind = bind_host.strip().lower().strip("[]")
    if bind in WILDCARD:
        names |= _this_machine()
    else:
        names.add(bind)
    return names


def _this_machine() -> set[str]:
    """This machine's names and addresses: what a client of a server bound to every interface may call it."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        names |= {info[4][0].lower() for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return names


def host_of(header: str) -> str:
    """The name in a Host header: 'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def parse_tokens(values) -> dict[str, str]:
    """{secret: name} from 'NAME=SECRET' or bare 'SECRET' (named DEFAULT_NAME) strings; ValueError on a bad one."""
    tokens = {}
    for value in values:
        name, _, secret = value.rpartition("=") if "=" in value else (DEFAULT_NAME, "", value)
        name, secret = name.strip() or DEFAULT_NAME, secret.strip()
        if len(secret) < 8:
            raise ValueError(f"access token {secret[:3]!r}... is too short: give at least 8 characters "
                             "(--token NAME=SECRET)")
        tokens[secret] = name
    return tokens


def new_token() -> str:
    return secrets.token_urlsafe(18)


def user_of(tokens: dict[str, str], secret: str | None) -> str | None:
    """The name of the token ``secret`` (compared in constant time), or None."""
    if not secret:
        return None
    found = None
    for known, name in tokens.items():
        if hmac.compare_digest(known.encode(), secret.encode()):
            found = name
    return found


class HostCheck:
    """ASGI middleware: 400 for a Host header not in ``hosts`` (module docstring)."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_of(header) not in self.hosts:
                shown = header[:80] or "(none)"
                response = JSONResponse({"error": f"this server does not answer to Host {shown!r}: open it as "
                                                  "localhost, or start `vmr serve` with --allow-host NAME"},
                                        status_code=400)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class TokenCheck:
    """ASGI middleware: 401 without a known token but on the page and its login; sets scope["vmr_user"]."""

    def __init__(self, app, tokens: dict[str, str]):
        self.app, self.tokens = app, tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        user = user_of(self.tokens, _presented(scope))
        path = scope.get("path", "")
        if user is None and path not in OPEN_PATHS and not path.startswith("/static/"):
            response = JSONResponse({"error": "this server needs its access token: open the page and give it, or "
                                              "send 'Authorization: Bearer TOKEN'"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app({**scope, "vmr_user": user}, receive, send)


def _presented(scope) -> str | None:
    """The token a request carries: its Authorization Bearer header, else the login cookie."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == COOKIE:
            return value
    return None
