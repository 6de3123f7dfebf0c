"""Queues and the tasks each carries: the only names a message may have."""

from __future__ import annotations

from enum import StrEnum

import redis

from protocol import keys


class Queue(StrEnum):
    EMBED = "embed"  # bulk catalogue embedding: any number of processes on any number of machines
    INDEX = "index"  # changes to the index: only the index owner consumes it
    QUERY = "query"  # searches by image: query processes (any number), which embed them in micro-batches
    SEARCH = "search"  # reads the owner answers itself (when no replica keeps up), and the near-duplicate walk


class Task(StrEnum):
    """Every task a worker registers, by the name its messages carry."""

    PLAN_LOAD = "lookalike.plan_load"
    EMBED_BATCH = "lookalike.embed_batch"
    APPLY_CHANGES = "lookalike.apply_changes"
    DELETE_ITEMS = "lookalike.delete_items"
    WRITE_SNAPSHOT = "lookalike.write_snapshot"
    BUILD_INDEX = "lookalike.build_index"
    ADVANCE_BUILD = "lookalike.advance_build"
    REPROJECT_BATCH = "lookalike.reproject_batch"
    ROLLBACK_INDEX = "lookalike.rollback_index"
    DELETE_INDEX = "lookalike.delete_index"
    CALIBRATE_INDEX = "lookalike.calibrate_index"
    SEARCH_IMAGE = "lookalike.search_image"
    NEAREST = "lookalike.nearest"
    SIMILAR_ITEMS = "lookalike.similar_items"
    GET_ITEM = "lookalike.get_item"
    INDEX_STATS = "lookalike.index_stats"
    FIND_DUPLICATES = "lookalike.find_duplicates"


ROUTES: dict[Task, Queue] = {
    Task.PLAN_LOAD: Queue.EMBED,
    Task.EMBED_BATCH: Queue.EMBED,
    Task.APPLY_CHANGES: Queue.INDEX,
    Task.DELETE_ITEMS: Queue.INDEX,
    Task.WRITE_SNAPSHOT: Queue.INDEX,
    Task.BUILD_INDEX: Queue.INDEX,
    Task.ADVANCE_BUILD: Queue.INDEX,
    Task.REPROJECT_BATCH: Queue.INDEX,
    Task.ROLLBACK_INDEX: Queue.INDEX,
    Task.DELETE_INDEX: Queue.INDEX,
    Task.CALIBRATE_INDEX: Queue.INDEX,
    Task.SEARCH_IMAGE: Queue.QUERY,
    # Reads go to the replicas directly (`protocol.readers`); as tasks, only to the owner, when none keeps up.
    Task.NEAREST: Queue.SEARCH,
    Task.SIMILAR_ITEMS: Queue.SEARCH,
    Task.GET_ITEM: Queue.SEARCH,
    Task.INDEX_STATS: Queue.SEARCH,
    Task.FIND_DUPLICATES: Queue.SEARCH,
}


READS_LIST = "reads"  # how queue_depths names the replicas' list of reads (`protocol.keys.READS`)


def queue_depths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each queue (kombu's Redis transport keeps a queue as a list under its name), and the
    reads no replica took yet."""
    with client.pipeline() as pipe:
        for queue in Queue:
            pipe.llen(queue)
        pipe.llen(keys.READS)
        *depths, reads = pipe.execute()
    return {**{str(queue): depth for queue, depth in zip(Queue, depths, strict=True)}, READS_LIST: reads}
