"""The engine: model loading and the contract check, image decoding, and (later) the Celery tasks and index.

Kept import-light: nothing here imports Celery or onnxruntime until a module that needs it is imported.
"""
