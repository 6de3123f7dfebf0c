"""The workers: Celery tasks, embedding, the durable hnswlib index and its one owner, catalogue loads, the recovery
of orphaned messages, and the evaluation of retrieval quality.

Kept import-light: nothing here imports Celery, onnxruntime or hnswlib until a module that needs it is imported.
"""
