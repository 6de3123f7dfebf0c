"""Who may write (start catalogue loads, add or replace products, delete items): the holder of the API key, from
anywhere, loopback included.

Every request that may change something is a write unless it is a search; it is checked before its body is read.
Scripts send the key as `Authorization: Bearer`; a browser signs in once with the key on the catalogue page and
then carries, for its session, a cookie that is an HMAC of its CSRF nonce under the key.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from flask import Response, current_app, request

from common.errors import ErrorCode
from web.csrf import browser_nonce, require_form_token, set_host_cookie
from web.errors import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# searches and recommendations change nothing: anyone may send them
PUBLIC_POSTS = frozenset({"api.search", "pages.search", "api.recommend", "pages.recommend"})
SIGN_IN = "pages.sign_in"  # the key itself comes in its small form body, checked by the view
BROWSER_WRITES = frozenset({"pages.start_load"})  # forms of a signed-in browser
WRITER_COOKIE = "__Host-lookalike_writer"
SAME_SITE = {"same-origin", "none"}  # Sec-Fetch-Site of our own pages and of a typed-in request


def is_write() -> bool:
    """A request that may change something; one Flask will answer 404 or 405 changes nothing."""
    routed = request.routing_exception is None
    return routed and request.method not in SAFE_METHODS and request.endpoint not in PUBLIC_POSTS


def require_writer() -> None:
    """Before any body is read: 401 (or 403 for another site's page, a stale form) unless the key's holder asks."""
    refuse_cross_site()
    if request.endpoint == SIGN_IN:
        require_form_token()
    elif request.endpoint in BROWSER_WRITES:
        if not browser_signed_in():
            raise unauthorized("enter the API key on the catalogue page first (this browser has not, or it changed)")
        require_form_token()
    elif not is_the_key(_bearer_token()):
        raise unauthorized(
            "this needs the API key: send Authorization: Bearer <key> (LOOKALIKE_API_KEY, or the key that "
            "lookalike web wrote to LOOKALIKE_DATA_DIR/api-key)"
        )


def is_the_key(given: str) -> bool:
    key = current_app.config["LOOKALIKE"].api_key
    # compare_digest: the time taken says nothing about how much of the key was right
    return bool(key and given) and hmac.compare_digest(given.encode(), key.encode())


def unauthorized(message: str) -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, {"WWW-Authenticate": 'Bearer realm="lookalike"'})


def sign_in_browser(response: Response) -> Response:
    """After the key came in the sign-in form: this browser may use the catalogue form until it closes."""
    set_host_cookie(response, WRITER_COOKIE, _writer_mark(browser_nonce()))
    return response


def browser_signed_in() -> bool:
    nonce = browser_nonce()
    given = request.cookies.get(WRITER_COOKIE, "")
    return bool(nonce and given and current_app.config["LOOKALIKE"].api_key) and hmac.compare_digest(
        _writer_mark(nonce), given
    )


def refuse_cross_site() -> None:
    """Another site's page may not make a browser write here (CSRF); scripts and curl send neither header.

    `Origin` is compared with the host the browser asked for: behind LOOKALIKE_TRUSTED_PROXIES, the forwarded one.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if (fetch_site and fetch_site not in SAME_SITE) or (origin and urlsplit(origin).netloc != request.host):
        raise ApiError(403, ErrorCode.CROSS_SITE, "changes to the catalogue can't come from another site's page")


def _writer_mark(nonce: str) -> str:
    """Only the key's holder can make it, and it holds only beside this browser's own nonce."""
    key = current_app.config["LOOKALIKE"].api_key.encode()
    return hmac.new(key, f"writer:{nonce}".encode(), hashlib.sha256).hexdigest()


def _bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
