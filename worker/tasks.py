"""Celery tasks: thin wrappers that turn messages into calls on the catalogue, embedding and index code.

Shared tasks, named as `protocol.queues.Task` names them: they belong to whichever app the worker's entry point
created (`protocol.celery_app.create_celery`), and this module builds no app of its own. A task whose outcome
goes to a job record, or nowhere, stores no Celery result (`ignore_result`): a write fewer for each, and none to
fail after the work is done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import shared_task

from common.areas import CatalogError
from common.errors import ErrorCode
from protocol import keys
from protocol.jobs import item_error
from protocol.queues import Task
from protocol.readers import latest_change
from worker import runtime
from worker.catalog import batches, plan_catalog
from worker.embedding import embed_items
from worker.owner import IndexOwner

log = logging.getLogger(__name__)


def owner() -> IndexOwner:
    current = runtime.state().owner
    if current is None:
        raise RuntimeError("this process does not own the index (start it with `lookalike worker index`)")
    return current


def delivered_too_often(task: Any, job_id: str) -> bool:
    """Count this start of the task; True once its message was handed out more than LOOKALIKE_MAX_DELIVERIES times
    (the workers it was handed to died on it: out of memory, a crash in a decoder or the model)."""
    return runtime.jobs().count_delivery(job_id, task.request.id) > runtime.settings().max_deliveries


def worker_lost(ids: list[str]) -> dict[str, dict[str, str]]:
    deliveries = runtime.settings().max_deliveries
    message = (
        f"a worker died on this item's batch {deliveries} times (out of memory, or a crash reading it); "
        "check the image, or raise the workers' memory and load it again"
    )
    return {item_id: item_error(ErrorCode.WORKER_LOST, message) for item_id in ids}


@shared_task(name=Task.PLAN_LOAD, bind=True, ignore_result=True)
def plan_load(self: Any, job_id: str, source: str, metadata_csv: str | None = None) -> dict[str, int]:
    """Read the catalogue, refuse bad rows up front, and queue its items in batches of references."""
    jobs, settings = runtime.jobs(), runtime.settings()
    if not jobs.start(job_id):
        return {"total": 0}  # finished already: a redelivered message
    if delivered_too_often(self, job_id):
        message = f"a worker died reading catalogue {source} {settings.max_deliveries} times (out of memory?)"
        jobs.fail(job_id, item_error(ErrorCode.WORKER_LOST, message))
        return {"total": 0}
    try:
        plan = plan_catalog(settings, source, metadata_csv)
    except CatalogError as error:
        jobs.fail(job_id, item_error(ErrorCode.BAD_CATALOG, str(error)))
        return {"total": 0}
    except Exception as error:
        log.exception("load %s: the catalogue could not be planned", job_id)
        jobs.fail(job_id, item_error(ErrorCode.PLAN_FAILED, f"the catalogue could not be read: {error}"))
        return {"total": 0}
    jobs.record(job_id, planning_errors=plan.errors)
    messages = [item.as_message() for item in plan.items]
    jobs.remember_items(job_id, messages)  # what the watchdog re-queues should a message be lost
    queued = 0
    try:
        for batch in batches(messages, settings.batch):
            embed_batch.delay(job_id, batch)
            queued += len(batch)
    except Exception as error:  # the items not queued are counted failed, or the load would wait for them for ever
        log.exception("load %s: %d items could not be queued", job_id, len(messages) - queued)
        reason = item_error(ErrorCode.ENQUEUE_FAILED, f"the item could not be queued: {error}; load it again")
        jobs.record(job_id, errors={message["id"]: reason for message in messages[queued:]})
    jobs.set_total(job_id, plan.total)
    log.info("load %s: %d items queued, %d rows refused", job_id, queued, len(plan.errors))
    return {"total": plan.total, "queued": queued, "refused": len(plan.errors)}


@shared_task(name=Task.EMBED_BATCH, bind=True, ignore_result=True)
def embed_batch(self: Any, job_id: str, items: list[dict[str, Any]], model: str | None = None) -> dict[str, int]:
    """Embed a batch with the serving index's model, or with `model` for an index being built (every item then:
    what the serving index holds says nothing of the new one)."""
    jobs, state = runtime.jobs(), runtime.state()
    ids = [item["id"] for item in items]
    if delivered_too_often(self, job_id):
        jobs.record(job_id, errors=worker_lost(ids))
        return {"changes": 0, "unchanged": 0, "failed": len(ids)}
    try:
        known = {
            item_id: tuple(value.decode().split(":"))
            for item_id, value in zip(ids, state.redis.hmget(keys.CHECKSUMS, ids), strict=True)
            if value is not None and model is None
        }
        embedder = runtime.embedding_model(model_file=Path(model) if model else None)
        outcome = embed_items(items, embedder, runtime.settings(), known)
    except Exception as error:  # every item must end up counted, or the load would never finish
        log.exception("load %s: a batch of %d could not be embedded", job_id, len(items))
        jobs.record(job_id, errors={item_id: item_error(ErrorCode.EMBED_FAILED, str(error)) for item_id in ids})
        return {"changes": 0, "unchanged": 0, "failed": len(ids)}
    if outcome.unchanged and (latest := latest_change(state.redis)) is not None:
        # The index holds these items as they are already, at a change no later than its latest: a load that
        # changed nothing (a product sent twice) still has a `seq` to read them at. Noted before they are counted.
        jobs.note_seq(job_id, latest)
    jobs.record(job_id, done=outcome.unchanged, errors=outcome.errors)
    if outcome.changes:
        try:
            apply_changes.delay(job_id, outcome.changes)
        except Exception as error:  # counted failed, or the load would wait for them for ever
            log.exception("load %s: %d changes could not be sent to the index owner", job_id, len(outcome.changes))
            reason = item_error(ErrorCode.ENQUEUE_FAILED, f"the item could not be queued: {error}; load it again")
            jobs.record(job_id, errors={change["id"]: reason for change in outcome.changes})
    return {"changes": len(outcome.changes), "unchanged": len(outcome.unchanged), "failed": len(outcome.errors)}


@shared_task(name=Task.APPLY_CHANGES, bind=True, ignore_result=True)
def apply_changes(self: Any, job_id: str | None, changes: list[dict[str, Any]]) -> dict[str, int]:
    if job_id and delivered_too_often(self, job_id):
        runtime.jobs().record(job_id, errors=worker_lost([change["id"] for change in changes]))
        return {"applied": 0, "failed": len(changes)}
    return owner().apply(job_id, changes)


@shared_task(name=Task.DELETE_ITEMS)
def delete_items(ids: list[str]) -> dict[str, int]:
    return owner().delete(ids)


@shared_task(name=Task.WRITE_SNAPSHOT, ignore_result=True)
def write_snapshot() -> None:
    owner().snapshot()


@shared_task(name=Task.BUILD_INDEX)
def build_index(model: str | None = None, allow_missing: int = 0) -> dict[str, Any]:
    return owner().build_index(model, allow_missing)


@shared_task(name=Task.ADVANCE_BUILD, ignore_result=True)
def advance_build() -> dict[str, Any]:
    return owner().advance_build()


@shared_task(name=Task.REPROJECT_BATCH, ignore_result=True)
def reproject_batch(job_id: str, ids: list[str]) -> dict[str, int]:
    return owner().reproject(job_id, ids)


@shared_task(name=Task.ROLLBACK_INDEX)
def rollback_index() -> dict[str, Any]:
    return owner().rollback()


@shared_task(name=Task.DELETE_INDEX)
def delete_index(index_id: str) -> dict[str, Any]:
    return owner().delete_index(index_id)


@shared_task(name=Task.CALIBRATE_INDEX)
def calibrate_index(calibration: dict[str, Any]) -> dict[str, Any]:
    return owner().calibrate(calibration)


# Reads, answered by a replica or the owner: the same answers from either (`worker.reader`).
@shared_task(name=Task.NEAREST)
def nearest(model_sha256: str, resize: str, queries: list[dict[str, Any]], min_seq: int = 0) -> dict[str, Any]:
    return runtime.reader().nearest(model_sha256, resize, queries, min_seq)


@shared_task(name=Task.SIMILAR_ITEMS)
def similar_items(item_id: str, k: int, filters: dict[str, str] | None = None, min_seq: int = 0) -> dict[str, Any]:
    return runtime.reader().similar(item_id, k, filters or {}, min_seq)


@shared_task(name=Task.GET_ITEM)
def get_item(item_id: str, min_seq: int = 0) -> dict[str, Any]:
    return runtime.reader().get(item_id, min_seq)


@shared_task(name=Task.INDEX_STATS)
def index_stats(min_seq: int = 0, digest: bool = False) -> dict[str, Any]:
    reader = runtime.reader()
    refused = reader.refusal(min_seq)
    if refused:
        return refused
    return {"stats": {**runtime.index_status(), **({"digest": reader.digest()} if digest else {})}}


DUPLICATES_CHUNK = 500  # items per task: searches queued meanwhile wait for one chunk at most
MOST_PAIRS = 10_000


@shared_task(name=Task.FIND_DUPLICATES, ignore_result=True)
def find_duplicates(job_id: str, threshold: float, k: int, after: str | None = None) -> None:
    """Walk the index in chunks of DUPLICATES_CHUNK items, each chunk a task of its own on the search queue."""
    jobs = runtime.jobs()
    try:
        _find_duplicates_after(job_id, threshold, k, after)
    except Exception as error:  # a job must never stay "running"
        log.exception("duplicates %s failed", job_id)
        jobs.fail(job_id, item_error(ErrorCode.DUPLICATES_FAILED, f"the near-duplicate search failed: {error}"))


def _find_duplicates_after(job_id: str, threshold: float, k: int, after: str | None) -> None:
    jobs = runtime.jobs()
    if after is None:
        if not jobs.start(job_id):
            return
        if len(owner().store.index):  # an empty index: no total, the job finishes below with its result
            jobs.set_total(job_id, len(owner().store.index))
    pairs, looked_at = owner().duplicate_pairs(after, DUPLICATES_CHUNK, threshold, k)
    jobs.add_rows(job_id, pairs)
    if len(looked_at) == DUPLICATES_CHUNK:
        # Counted short of the total (items a load adds meanwhile could reach it), so that only the last
        # chunk, below, finishes the job.
        progress = jobs.get(job_id, error_limit=0)["progress"]
        jobs.record(job_id, done=looked_at[: max(0, (progress["total"] or 0) - progress["done"] - 1)])
        find_duplicates.delay(job_id, threshold, k, looked_at[-1])
        return
    best: dict[tuple[str, str], dict] = {}
    for pair in jobs.rows(job_id):
        best[pair["a"], pair["b"]] = pair
    found = sorted(best.values(), key=lambda pair: (-pair["score"], pair["a"], pair["b"]))
    jobs.finish(job_id, {"threshold": threshold, "pairs": found[:MOST_PAIRS], "total_pairs": len(found)}, looked_at)
