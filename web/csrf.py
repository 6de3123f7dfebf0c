"""CSRF tokens for the HTML form that changes the catalogue.

The browser keeps a random nonce in a SameSite=Strict, HttpOnly cookie; the form carries the nonce's HMAC under
a secret that every web process shares through Redis. Another site's page can neither read the cookie nor
compute the HMAC, so it can't make a valid form. The JSON API needs no token: it takes the API key in a header,
which a cross-site form can't send.
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

COOKIE = "lookalike_csrf"
FIELD = "csrf_token"


def form_token() -> str:
    """The token for a form on this page (a template global); "" while Redis, which keeps the secret, is down."""
    nonce = request.cookies.get(COOKIE) or g.get("csrf_nonce") or secrets.token_urlsafe(32)
    g.csrf_nonce = nonce
    try:
        return _sign(nonce)
    except redis.RedisError:
        return ""


def set_nonce_cookie(response: Response) -> Response:
    """After a page that made a new nonce: give it to the browser."""
    nonce = g.get("csrf_nonce")
    if nonce and request.cookies.get(COOKIE) != nonce:
        response.set_cookie(COOKIE, nonce, httponly=True, samesite="Strict", secure=request.is_secure)
    return response


def require_form_token() -> None:
    """403 unless the form carries the token of the nonce in this browser's cookie."""
    nonce, given = request.cookies.get(COOKIE, ""), request.form.get(FIELD, "")
    valid = bool(nonce and given) and (
        hmac.compare_digest(_sign(nonce), given) or hmac.compare_digest(_sign(nonce, refresh=True), given)
    )
    if not valid:
        raise ApiError(
            403,
            ErrorCode.CSRF,
            "this form is out of date or was sent from another site's page: reload the page and try again",
        )


def _sign(nonce: str, refresh: bool = False) -> str:
    return hmac.new(service().form_secret(refresh), nonce.encode(), hashlib.sha256).hexdigest()
