"""Who may write (start catalogue loads, delete items): the API key holder, or loopback when no key is set."""

from __future__ import annotations

import hmac
import ipaddress

from flask import current_app, request

from web.errors import ApiError

PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def require_writer() -> None:
    """Raise 401/403 unless the request may change the catalogue."""
    key = current_app.config["LOOKALIKE"].api_key
    if key:
        given = _bearer_token() or request.form.get("api_key", "")
        # compare_digest: the time taken says nothing about how much of the key was right
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401, "unauthorized", "this needs the API key: Authorization: Bearer <LOOKALIKE_API_KEY>",
                {"WWW-Authenticate": 'Bearer realm="lookalike"'},
            )  # fmt: skip
    elif not is_direct_loopback():
        raise ApiError(
            403, "forbidden", "LOOKALIKE_API_KEY is not set, so only clients on this machine may change the catalogue"
        )


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
