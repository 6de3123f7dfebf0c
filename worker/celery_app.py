"""The one Celery app: JSON only, late acks, queues for bulk embedding, index writes and searches."""

from __future__ import annotations

import redis
from celery import Celery
from kombu import Exchange, Queue

from common.settings import Settings

EMBED_QUEUE = "embed"  # bulk catalogue embedding: any number of processes on any number of machines
INDEX_QUEUE = "index"  # changes to the index: only the index owner consumes it
SEARCH_QUEUE = "search"  # searches and reads: the index owner again, so they never queue behind bulk embedding
QUEUES = (EMBED_QUEUE, INDEX_QUEUE, SEARCH_QUEUE)

ROUTES = {
    "lookalike.plan_load": EMBED_QUEUE,
    "lookalike.embed_batch": EMBED_QUEUE,
    "lookalike.apply_changes": INDEX_QUEUE,
    "lookalike.delete_items": INDEX_QUEUE,
    "lookalike.search_image": SEARCH_QUEUE,
    "lookalike.similar_items": SEARCH_QUEUE,
    "lookalike.get_item": SEARCH_QUEUE,
    "lookalike.index_stats": SEARCH_QUEUE,
    "lookalike.find_duplicates": SEARCH_QUEUE,
}


def queue_depths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each queue (kombu's Redis transport keeps a queue as a list under its name)."""
    with client.pipeline() as pipe:
        for name in QUEUES:
            pipe.llen(name)
        return dict(zip(QUEUES, pipe.execute(), strict=True))


def make_celery(settings: Settings) -> Celery:
    app = Celery("lookalike", include=["worker.tasks"])
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,  # a task's message stays on the broker until its work is durable
        task_reject_on_worker_lost=True,  # a killed worker process gives its task back instead of losing it
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_time_limit - 5,
        # Redis re-delivers an unacknowledged message after this long: longer than any task may run.
        broker_transport_options={"visibility_timeout": settings.task_time_limit * 3},
        result_expires=settings.search_ttl,
        # Each queue its own direct exchange and routing key: a message's routing key then names its queue,
        # which is how a restarted index owner finds the messages its killed predecessor had taken.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=EMBED_QUEUE,
        task_default_exchange=EMBED_QUEUE,
        task_default_routing_key=EMBED_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        # A publish that can't reach Redis fails within seconds (the web answers 503) instead of hanging.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        redis_socket_timeout=10,
        redis_socket_connect_timeout=5,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_celery(Settings.from_env())
