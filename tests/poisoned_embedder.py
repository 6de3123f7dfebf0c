"""`lookalike worker embed`, except that embedding a batch with the item `poison` kills the process at once (as
the out-of-memory killer or a crash in a decoder would): tests/test_stuck_jobs.py runs it as a real worker."""

from __future__ import annotations

import os
import signal
import sys

import worker.tasks

POISON = "poison"
embed_items = worker.tasks.embed_items


def embed_or_die(items, *args, **kwargs):
    if any(item["id"] == POISON for item in items):
        os.kill(os.getpid(), signal.SIGKILL)
    return embed_items(items, *args, **kwargs)


worker.tasks.embed_items = embed_or_die

if __name__ == "__main__":  # not in the model check's spawned process, which imports this module too
    from lookalike.cli import main

    sys.exit(main(["worker", "embed"]))
