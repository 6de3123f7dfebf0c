"""CSRF tokens for the HTML forms that change the catalogue.

The server issues each browser a random nonce in a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict, Path=/, no
Domain: no other site nor a sibling subdomain can set or read it), signed so that a nonce the server did not issue is
not honoured. A form's token is another HMAC of that nonce, under a secret that every web process shares through
Redis, and travels in the form's URL (its query string): so it is checked, like the key, before the body is read.
Another site's page can neither read the cookie nor compute the token. The JSON API needs no token: it takes the API
key in a header, which a cross-site form can't send.

Browsers keep Secure cookies from https and from http://localhost or 127.0.0.1 (secure contexts); over plain http
under any other name the form can't be used (the API can). Flask's test client keeps them over http too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import redis
from flask import Response, g, request

from common.errors import ErrorCode
from web.errors import ApiError
from web.service import current_service as service

COOKIE = "__Host-lookalike_csrf"
FIELD = "csrf_token"


def form_token() -> str:
    """The token for a form on this page (a template global); "" while Redis, which keeps the secret, is down."""
    try:
        nonce = browser_nonce() or g.get("csrf_nonce")
        if not nonce:
            g.csrf_nonce = nonce = secrets.token_urlsafe(32)
        return _sign("form", nonce)
    except redis.RedisError:
        return ""


def set_nonce_cookie(response: Response) -> Response:
    """After a page that issued a new nonce: give it to the browser, signed."""
    nonce = g.get("csrf_nonce")
    if nonce:
        set_host_cookie(response, COOKIE, f"{nonce}.{_sign('nonce', nonce)}")
    return response


def set_host_cookie(response: Response, name: str, value: str) -> None:
    """A `__Host-` cookie for this browser session (no expiry): Secure, Path=/, no Domain, out of scripts' reach."""
    response.set_cookie(name, value, path="/", secure=True, httponly=True, samesite="Strict")


def browser_nonce() -> str:
    """The nonce in this browser's cookie if this server issued it; "" otherwise."""
    nonce, _, signature = request.cookies.get(COOKIE, "").partition(".")
    return nonce if nonce and _verify("nonce", nonce, signature) else ""


def require_form_token() -> None:
    """403 unless the form's URL carries the token of the nonce the server issued to this browser."""
    nonce = browser_nonce()
    if not (nonce and _verify("form", nonce, request.args.get(FIELD, ""))):
        raise ApiError(
            403,
            ErrorCode.CSRF,
            "this form is out of date or was sent from another site's page: reload the page and try again",
        )


def _verify(purpose: str, nonce: str, given: str) -> bool:
    """`given` is the HMAC for `purpose` of `nonce`, under the shared secret (read again if Redis made a new one)."""
    return bool(given) and any(hmac.compare_digest(_sign(purpose, nonce, refresh), given) for refresh in (False, True))


def _sign(purpose: str, nonce: str, refresh: bool = False) -> str:
    message = f"{purpose}:{nonce}".encode()
    return hmac.new(service().form_secret(refresh), message, hashlib.sha256).hexdigest()
