"""Who may write (start catalogue loads, delete items): the API key holder, or loopback when no key is set."""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from flask import current_app, request

from common.errors import ErrorCode
from web.errors import ApiError

PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SAME_SITE = {"same-origin", "none"}  # Sec-Fetch-Site of our own pages and of a typed-in request


def require_writer(form_key: bool = False) -> None:
    """Raise 401/403 unless the request may change the catalogue; `form_key`: a page's form may carry the key."""
    refuse_cross_site()
    key = current_app.config["LOOKALIKE"].api_key
    if key:
        given = _bearer_token() or (request.form.get("api_key", "") if form_key else "")
        # compare_digest: the time taken says nothing about how much of the key was right
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401, ErrorCode.UNAUTHORIZED, "this needs the API key: Authorization: Bearer <LOOKALIKE_API_KEY>",
                {"WWW-Authenticate": 'Bearer realm="lookalike"'},
            )  # fmt: skip
    elif not is_direct_loopback() or urlsplit(f"//{request.host}").hostname not in LOOPBACK_NAMES:
        # The host name too: a page whose DNS name was re-pointed at 127.0.0.1 would otherwise pass as local.
        raise ApiError(
            403,
            ErrorCode.FORBIDDEN,
            "LOOKALIKE_API_KEY is not set, so only clients on this machine may change the catalogue",
        )


def refuse_cross_site() -> None:
    """Another site's page may not make a browser write here (CSRF); scripts and curl send neither header."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if (fetch_site and fetch_site not in SAME_SITE) or (origin and urlsplit(origin).netloc != request.host):
        raise ApiError(403, ErrorCode.CROSS_SITE, "changes to the catalogue can't come from another site's page")


def is_direct_loopback() -> bool:
    """A client on this machine, not relayed by a proxy (a local reverse proxy makes everyone look local)."""
    if any(header in request.headers for header in PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def _bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
