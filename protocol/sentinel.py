"""Redis Sentinel: the `sentinel://` form of LOOKALIKE_REDIS_URL, and connections (redis-py's and kombu's) to the
primary the sentinels name, which follow their `+switch-master` announcements to a new one at once."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from kombu.transport import redis as kombu_redis
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from common.settings import Settings

log = logging.getLogger(__name__)

SCHEME = "sentinel"
DEFAULT_PORT = 26379
TIMEOUT = 2.0  # seconds for a sentinel's answer: another sentinel is asked after that
SWITCH_CHANNEL = "+switch-master"
SENTINELS_AGREE_SECONDS = 30.0  # after a switch, by when every sentinel names the new primary (they talk every 2 s)
WATCH_AGAIN_SECONDS = 1.0  # after a sentinel dropped the watch: it is asked again


def uses_sentinel(url: str) -> bool:
    return url.startswith(f"{SCHEME}://")


def sentinel_addresses(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """The sentinels (host, port), the primary's password and the database of a `sentinel://` URL in kombu's form:
    `sentinel://[:password@]host:port;sentinel://host:port/db`."""
    hosts, password, db = [], None, 0
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        if parsed.scheme != SCHEME or not parsed.hostname:
            raise ValueError(f"{part!r} is no sentinel://host:port address")
        hosts.append((parsed.hostname, parsed.port or DEFAULT_PORT))
        password = unquote(parsed.password) if parsed.password else password
        db = int(parsed.path.strip("/") or db)
    return hosts, password, db


def broker_url(settings: Settings) -> str:
    """LOOKALIKE_REDIS_URL as kombu and Celery's result backend read it: they take the database and the password
    from the first sentinel's address only, so each address carries them (the other clients here read either form)."""
    if not uses_sentinel(settings.redis_url):
        return settings.redis_url
    hosts, password, db = sentinel_addresses(settings.redis_url)
    credentials = f":{quote(password, safe='')}@" if password else ""
    return ";".join(f"{SCHEME}://{credentials}{host}:{port}/{db}" for host, port in hosts)


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to talk to the sentinels themselves."""
    own = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
    return own | ({"password": settings.redis_sentinel_password} if settings.redis_sentinel_password else {})


def transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu and Celery's result backend need besides a `sentinel://` URL (nothing for a plain Redis URL)."""
    if not uses_sentinel(settings.redis_url):
        return {}
    return {"master_name": settings.redis_master, "sentinel_kwargs": sentinel_kwargs(settings)}


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the sentinels name, which follows them to a new one. It asks them each time it
    connects: redis-py 8 reconnects a dropped connection through `connect_check_health`, past
    SentinelManagedConnection's own `connect`, and so went on dialling a dead primary for a worker's whole patience
    (redis-py#3874). And it leaves the old primary as soon as they announce a switch: a demoted primary takes writes
    until Sentinel tells it what it is now (some 10 s later), and the clients that stayed on it would lose them."""

    reconnects_in_place = True  # False for kombu's polled connection: its poller must learn of a new socket
    switches_seen = -1  # how many switches of its primary the process had heard of when this one connected

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock:
            return
        pool = self.connection_pool
        watch = watch_switches(pool.service_name, pool.sentinel_manager.sentinels)
        self.switches_seen = watch.switches
        # the sentinel asked may not have heard of the switch yet; the one that announced it has
        self.host, self.port = watch.recent_primary() or self._primary_address()
        # one try per address: the command's own retry asks the sentinels again, after its backoff
        super().connect_check_health(check_health, retry_socket_connect=False)

    def _primary_address(self) -> tuple[str, int]:
        pool = self.connection_pool
        try:
            return pool.get_master_address()
        except MasterNotFoundError:
            if pool.master_address is None or any(_answers(sentinel) for sentinel in pool.sentinel_manager.sentinels):
                raise  # they know of no primary now: a failover under way
            # No sentinel answers (they are stopped before the workers, or restarting): the primary they last named
            # still serves as far as anyone knows; a dead one refuses the connection, as it would anyway.
            return pool.master_address

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        watch = _watches.get(_watch_key(self.connection_pool.service_name))  # none yet in a forked child
        if self._sock and (watch is None or self.switches_seen != watch.switches):
            self.disconnect()  # nothing of this command was sent: it goes to the new primary whole
            if not self.reconnects_in_place:
                raise redis.ConnectionError(f"the Redis primary of {self.connection_pool.service_name!r} switched")
        super().send_packed_command(command, check_health)


def _answers(sentinel: redis.Redis) -> bool:
    try:
        return bool(sentinel.ping())
    except redis.RedisError:
        return False


class SentinelChannel(kombu_redis.SentinelChannel):
    connection_class = PrimaryConnection

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params = super()._connparams(asynchronous)
        if asynchronous:  # a consumer's socket is in kombu's poller: a switch goes through kombu's reconnection
            polled = type("PolledPrimaryConnection", (params["connection_class"],), {"reconnects_in_place": False})
            params["connection_class"] = polled
        return params


class Transport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport on PrimaryConnection (Celery's `broker_transport` with a `sentinel://` URL)."""

    Channel = SentinelChannel


def primary_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of the primary the sentinels name."""
    hosts, password, db = sentinel_addresses(settings.redis_url)
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs(settings))
    return sentinel.master_for(
        settings.redis_master, password=password, db=db, connection_class=PrimaryConnection, **options
    )


class SwitchWatch:
    """Counts the switches of one primary the sentinels announce (`+switch-master`), listening to every sentinel at
    once: each announces a switch when it learns of it, the leader of the failover at once, the others up to a few
    seconds later."""

    def __init__(self, master: str, sentinels: list[redis.Redis]) -> None:
        self.master = master
        self.switches = 0
        self.primary: tuple[str, int] | None = None  # as the last announcement named it
        self.announced = 0.0  # when (monotonic)
        self._lock = threading.Lock()
        for sentinel in sentinels:
            threading.Thread(target=self._listen, args=(sentinel,), name="sentinel-watch", daemon=True).start()

    def _listen(self, sentinel: redis.Redis) -> None:
        while True:
            try:
                self._watch(sentinel)
            except redis.RedisError as error:  # that sentinel is away: the others still tell
                log.debug("sentinel %s can't be watched: %s", sentinel, error)
            time.sleep(WATCH_AGAIN_SECONDS)

    def _watch(self, sentinel: redis.Redis) -> None:
        with sentinel.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(SWITCH_CHANNEL)
            while True:
                message = pubsub.get_message(timeout=TIMEOUT * 5)
                if message is None:
                    pubsub.ping()  # a sentinel that died in silence is found here
                    continue
                if message["type"] != "message":  # the ping's pong
                    continue
                name, *_, host, port = message["data"].decode().split()
                if name == self.master:
                    self._switched_to((host, int(port)))

    def _switched_to(self, primary: tuple[str, int]) -> None:
        with self._lock:
            if primary == self.primary:
                return  # another sentinel telling the same switch
            self.primary, self.announced = primary, time.monotonic()
            self.switches += 1
        log.warning("the Redis primary %r switched to %s:%d: reconnecting", self.master, *primary)

    def recent_primary(self) -> tuple[str, int] | None:
        """The primary the last switch named, while some sentinels may not know of it yet."""
        return self.primary if time.monotonic() - self.announced < SENTINELS_AGREE_SECONDS else None


_watches: dict[tuple[int, str], SwitchWatch] = {}
_watches_lock = threading.Lock()


def _watch_key(master: str) -> tuple[int, str]:
    return os.getpid(), master  # a forked child watches for itself: threads don't survive a fork


def watch_switches(master: str, sentinels: list[redis.Redis]) -> SwitchWatch:
    """This process's watch of the primary `master`, started on first use."""
    with _watches_lock:
        watch = _watches.get(_watch_key(master))
        if watch is None:
            watch = _watches[_watch_key(master)] = SwitchWatch(master, sentinels)
        return watch
