"""What the web, the workers and the commands say to each other, through Redis only.

Queue and task names (`queues`), the Redis key layout (`keys`), job records (`jobs`), heartbeats (`heartbeats`),
the Celery app factory (`celery_app`) and the typed client (`client`). Error codes are `common.errors.ErrorCode`.
Both sides import this package; neither imports the other.
"""
