"""The Celery app factory: JSON only, late acks, a queue of its own for bulk embedding, index writes and searches.

Nothing is built at import time: each entry point (a worker, the web, a command) creates the one app it uses.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange
from kombu import Queue as KombuQueue

from common.settings import Settings
from protocol.queues import ROUTES, Queue
from protocol.sentinel import broker_url, transport_options, uses_sentinel

SENTINEL_TRANSPORT = "protocol.sentinel:Transport"  # kombu's, on connections that follow a switch at once
BROKER_SOCKET_TIMEOUT = 30  # seconds; more than kombu's 1 s BRPOP and its health checks (25 s) take


def create_celery(settings: Settings, publish_patience: int = 0) -> Celery:
    """The app; with `publish_patience`, a send rides out that many seconds of Redis restarting (the workers')."""
    app = Celery("lookalike", set_as_current=True)
    app.conf.update(
        broker_url=broker_url(settings),
        result_backend=broker_url(settings),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,  # a task's message stays on the broker until its work is durable
        task_reject_on_worker_lost=True,  # a killed worker process gives its task back instead of losing it
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_time_limit - 5,
        broker_transport_options={
            # Redis re-delivers an unacknowledged message after this long: longer than any task may run.
            "visibility_timeout": settings.task_time_limit * 3,
            # kombu's sockets wait for ever by default: a primary that vanished mid-command would hang the worker
            "socket_timeout": BROKER_SOCKET_TIMEOUT,
            "socket_connect_timeout": 5,
            **transport_options(settings),
        },
        result_backend_transport_options=transport_options(settings),
        broker_transport=SENTINEL_TRANSPORT if uses_sentinel(settings.redis_url) else None,
        result_expires=settings.search_ttl,
        # Each queue its own direct exchange and routing key: a message's routing key then names its queue,
        # which is how a restarted index owner finds the messages its killed predecessor had taken.
        task_queues=[_queue(str(queue)) for queue in Queue],
        # Every task has its route; a name outside protocol.queues.Task can't be sent (see protocol.client).
        task_routes={str(task): {"queue": str(queue)} for task, queue in ROUTES.items()},
        task_create_missing_queues=False,
        # A publish that can't reach Redis fails within seconds (the web answers 503) instead of hanging; a worker's
        # waits for it as its other Redis calls do, or a batch embedded just before a restart would be counted failed.
        task_publish_retry_policy={
            "max_retries": max(2, publish_patience),
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        redis_socket_timeout=10,
        redis_socket_connect_timeout=5,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def _queue(name: str) -> KombuQueue:
    return KombuQueue(name, Exchange(name, type="direct"), routing_key=name)
