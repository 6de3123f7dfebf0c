"""Writes need the API key, from anywhere: every write route, the key file, bodies left unread, the form's sign-in."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.api_key import key_path
from common.settings import Settings
from lookalike.redis_server import free_port
from lookalike.stack import LOOKALIKE, Stack
from web.app import create_app

API_KEY = "the-shops-own-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
AS_JSON = {"Accept": "application/json"}
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "127.0.0.1:8000", "[::1]:8000"]
TOKEN = re.compile(r'action="[^"]*\?csrf_token=([0-9a-f]+)"')
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# searches and recommendations: the only requests besides reads that anyone may make
SEARCHES = {"api.search", "pages.search", "api.recommend", "pages.recommend"}
COOKIE, WRITER_COOKIE = "__Host-lookalike_csrf", "__Host-lookalike_writer"  # this browser's nonce, its sign-in
# nginx's `proxy_pass http://127.0.0.1:8000` in front of the web: Host rewritten, the browser's in X-Forwarded-*
FORWARDED = {"X-Forwarded-Host": "shop.example", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
PROXIED = {"Host": "127.0.0.1:8000", **FORWARDED}
OWN_PAGE = {"Origin": "https://shop.example", "Sec-Fetch-Site": "same-origin"}  # the shop's page at that address


def web_for(redis_url: str, tmp_path: Path, shared_dir: Path, flush: bool = True, **env: str):
    """A test client of the web (another browser on each call); `flush`: on an emptied Redis."""
    settings = Settings.from_env({"LOOKALIKE_REDIS_URL": redis_url, "LOOKALIKE_DATA_DIR": str(tmp_path),
                                  "LOOKALIKE_CATALOG_ROOT": str(shared_dir / "data"), **env})  # fmt: skip
    web = create_app(settings).test_client()
    if flush:
        web.application.extensions["lookalike"].redis.flushdb()
    return web


@pytest.fixture
def web(module_redis, tmp_path, shared_dir):
    """The web with a key set, on a real, empty Redis with no worker running."""
    return web_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY=API_KEY)


def page_token(client, **options) -> str:
    """The CSRF token in the catalogue page's form (this browser's cookie is set by the same request)."""
    return TOKEN.search(client.get("/catalog", **options).get_data(as_text=True)).group(1)


def sign_in(client, key: str = API_KEY):
    return client.post(f"/catalog/key?csrf_token={page_token(client)}", data={"api_key": key})


def write_routes(app) -> list[tuple[str, str, str]]:
    """(endpoint, method, path) of every route that may change something, from the app's own url_map."""
    return sorted(
        (rule.endpoint, method, re.sub(r"<[^>]+>", "x", rule.rule))
        for rule in app.url_map.iter_rules()
        for method in rule.methods - SAFE_METHODS
        if rule.endpoint not in SEARCHES
    )


@pytest.mark.parametrize("configured", [{"LOOKALIKE_API_KEY": API_KEY}, {}], ids=["key-set", "no-key-at-all"])
@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_every_write_route_without_the_key_is_401_even_from_loopback(module_redis, tmp_path, shared_dir, configured,
                                                                      host):  # fmt: skip
    web = web_for(module_redis, tmp_path, shared_dir, **configured)
    routes = write_routes(web.application)
    assert {endpoint for endpoint, _, _ in routes} >= {"api.start_load", "api.delete", "pages.start_load"}
    for endpoint, method, path in routes:
        # a page's form as its own page makes it (cookie and token), so that the key is all it lacks
        query = f"?csrf_token={page_token(web, headers={'Host': host})}" if endpoint.startswith("pages.") else ""
        for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": API_KEY}):
            response = web.open(path + query, method=method, data={"source": "fashion"},
                                headers={"Host": host, **AS_JSON, **headers})  # fmt: skip
            assert response.status_code == 401, (endpoint, method, headers, response.data[:300])
            assert response.get_json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert not web.application.extensions["lookalike"].jobs.redis.keys("lookalike:job:*"), "nothing was queued"


def test_with_the_key_a_write_is_accepted_from_any_address(web):
    elsewhere = {"REMOTE_ADDR": "203.0.113.9"}
    accepted = web.post("/api/catalog/loads", json={"source": "fashion"}, headers=AUTH, environ_base=elsewhere)
    assert accepted.status_code == 202
    job = web.get(accepted.get_json()["status_url"]).get_json()
    assert (job["kind"], job["state"]) == ("load", "queued")  # no embed worker yet: it waits in the queue
    assert [load["id"] for load in web.get("/api/catalog/loads").get_json()["loads"]] == [job["id"]]
    # the API takes the key from the Authorization header only, not from a form field
    assert web.post("/api/catalog/loads", data={"source": "fashion", "api_key": API_KEY}).status_code == 401


class Untouched(io.RawIOBase):
    """A request body (2 GiB, says its Content-Length) that counts the attempts to read it, and then ends."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.reads += 1
        return 0


@pytest.mark.parametrize("path", ["/api/catalog/loads", "/catalog"])
def test_a_catalogue_upload_without_the_key_is_refused_before_its_body_is_read(web, path):
    body = Untouched()
    request = {"wsgi.input": body, "CONTENT_LENGTH": str(2 * 1024**3)}  # as the server hands it over
    response = web.post(path, content_type="multipart/form-data; boundary=x", headers=AS_JSON,
                        environ_overrides=request)  # fmt: skip
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthorized"
    assert body.reads == 0


def test_a_browser_gives_the_key_once_then_the_form_needs_its_cookie_and_token(web, module_redis, tmp_path,
                                                                                shared_dir):  # fmt: skip
    page = web.get("/catalog")
    assert b'name="api_key"' in page.data and b'name="source"' not in page.data  # asks for the key first
    nonce = web.get_cookie(COOKIE)
    assert nonce.secure and nonce.http_only and nonce.same_site == "Strict" and nonce.path == "/"
    refused = sign_in(web, "not-the-key")
    assert refused.status_code == 401 and b"not the API key" in refused.data and web.get_cookie(WRITER_COOKIE) is None
    assert sign_in(web).status_code == 303
    writer = web.get_cookie(WRITER_COOKIE)
    assert writer.secure and writer.http_only and writer.expires is None  # for this browser session only
    page = web.get("/catalog")
    assert b'name="source"' in page.data and b'name="api_key"' not in page.data  # not asked again
    token = TOKEN.search(page.get_data(as_text=True)).group(1)
    assert web.post(f"/catalog?csrf_token={token}", data={"source": "fashion"}).status_code == 303
    assert len(web.get("/api/catalog/loads").get_json()["loads"]) == 1

    for query in ("", "?csrf_token=" + "0" * 64):  # no token, a made-up one
        stale = web.post(f"/catalog{query}", data={"source": "fashion"})
        assert stale.status_code == 403 and b"reload the page" in stale.data
    other = web_for(module_redis, tmp_path / "other", shared_dir, flush=False, LOOKALIKE_API_KEY=API_KEY)
    assert sign_in(other).status_code == 303
    foreign = page_token(other)  # a valid token, of another browser's nonce
    assert web.post(f"/catalog?csrf_token={foreign}", data={"source": "fashion"}).status_code == 403
    # another browser's sign-in does not carry over to this one's nonce, nor does a nonce the server did not issue
    third = web_for(module_redis, tmp_path / "third", shared_dir, flush=False, LOOKALIKE_API_KEY=API_KEY)
    third.set_cookie(WRITER_COOKIE, writer.value)
    assert third.post(f"/catalog?csrf_token={page_token(third)}", data={"source": "fashion"}).status_code == 401
    third.set_cookie(COOKIE, "made-up.0000")
    assert b'name="api_key"' in third.get("/catalog").data and third.get_cookie(COOKIE).value != "made-up.0000"
    assert len(web.get("/api/catalog/loads").get_json()["loads"]) == 1


def test_a_forwarded_host_is_not_believed_unless_the_proxy_is_trusted(module_redis, tmp_path, shared_dir):
    """The default: X-Forwarded-* are anyone's to send, so a write whose Origin matches only them is another site's."""
    web = web_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY=API_KEY)
    browser = {**PROXIED, **OWN_PAGE, **AS_JSON}
    signed_in = web.post(f"/catalog/key?csrf_token={page_token(web, headers=PROXIED)}", data={"api_key": API_KEY},
                         headers=browser)  # fmt: skip
    loaded = web.post("/api/catalog/loads", json={"source": "fashion"}, headers={**AUTH, **browser})
    for response in (signed_in, loaded):
        assert response.status_code == 403 and response.get_json()["error"]["code"] == "cross_site"


def test_behind_a_trusted_proxy_that_rewrites_host_the_form_works_and_other_sites_are_still_refused(
    module_redis, tmp_path, shared_dir
):
    web = web_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY=API_KEY, LOOKALIKE_TRUSTED_PROXIES="1")
    browser = {**PROXIED, **OWN_PAGE, **AS_JSON}  # every request of this browser comes through the proxy
    signed_in = web.post(f"/catalog/key?csrf_token={page_token(web, headers=PROXIED)}", data={"api_key": API_KEY},
                         headers=browser)  # fmt: skip
    assert signed_in.status_code == 303, signed_in.data[:300]
    token = page_token(web, headers=PROXIED)
    assert web.post(f"/catalog?csrf_token={token}", data={"source": "fashion"}, headers=browser).status_code == 303
    assert len(web.get("/api/catalog/loads").get_json()["loads"]) == 1
    for origin in ("https://evil.example", "http://127.0.0.1:8000"):  # another site; the address the proxy rewrote
        forged = web.post(f"/catalog?csrf_token={token}", data={"source": "fashion"},
                          headers={**browser, "Origin": origin})  # fmt: skip
        assert forged.status_code == 403 and forged.get_json()["error"]["code"] == "cross_site"


def test_lookalike_web_behind_a_trusted_proxy_checks_origin_against_the_forwarded_host(tmp_path, module_redis):
    """Over real HTTP through waitress, which drops X-Forwarded-* unless proxies are trusted."""
    data = tmp_path / "data"
    process, url, _ = serve(data, module_redis, LOOKALIKE_TRUSTED_PROXIES="1")
    try:
        authorised = {"Authorization": f"Bearer {key_path(data).read_text().strip()}"}
        forwarded = {**FORWARDED, **authorised}  # and Host: 127.0.0.1:<port>, as the proxy rewrote it
        assert _status(f"{url}/api/items/10186", "DELETE", {**forwarded, **OWN_PAGE}) == 503  # past the checks
        assert _status(f"{url}/api/items/10186", "DELETE", {**forwarded, "Origin": "https://evil.example"}) == 403
        assert _status(f"{url}/api/items/10186", "DELETE", {**authorised, **OWN_PAGE}) == 403  # no proxy's headers
    finally:
        process.terminate()
        process.wait(30)


def serve(data_dir: Path, redis_url: str, **env: str) -> tuple[subprocess.Popen, str, Path]:
    """`lookalike web` with no LOOKALIKE_API_KEY, as a user starts it (with `env`); its process, URL and output."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("LOOKALIKE_")}
    environ |= {"LOOKALIKE_DATA_DIR": str(data_dir), "LOOKALIKE_REDIS_URL": redis_url, **env}
    port, output = free_port(), data_dir.parent / f"web-{len(list(data_dir.parent.glob('web-*')))}.out"
    with open(output, "wb") as out:
        process = subprocess.Popen([LOOKALIKE, "web", "--port", str(port)], env=environ, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    Stack.wait_for(lambda: _status(f"{url}/healthz", "GET") is not None, "lookalike web to answer", process=process)
    return process, url, output


def _status(url: str, method: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers or {}), timeout=5):
            return 200
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def test_lookalike_web_makes_a_key_file_0600_at_its_first_start_shows_it_once_and_reuses_it(tmp_path, module_redis):
    data = tmp_path / "data"
    outputs, keys = [], []
    for _ in range(2):
        process, url, output = serve(data, module_redis)
        try:
            keys.append(key_path(data).read_text().strip())
            # over real HTTP from this machine: loopback is not special, the key file's key is what counts
            assert _status(f"{url}/api/items/10186", "DELETE") == 401
            authorised = {"Authorization": f"Bearer {keys[-1]}"}
            assert _status(f"{url}/api/items/10186", "DELETE", authorised) == 503  # past the key: no index worker
        finally:
            process.terminate()
            process.wait(30)
        outputs.append(output.read_text())
    assert stat.S_IMODE(key_path(data).stat().st_mode) == 0o600
    assert keys[0] == keys[1] and len(keys[0]) >= 40
    assert keys[0] in outputs[0] and f"kept in {key_path(data)}" in outputs[0]
    assert keys[0] not in outputs[1] and f"in {key_path(data)}" in outputs[1]  # shown only when it was made
