"""The Flask front end: search form, job pages, results gallery, catalogue loads and the JSON API.

It enqueues and polls through the protocol (Redis) only: it imports nothing from `worker/`, and never loads
onnxruntime, hnswlib or TensorFlow (tests/test_layers.py checks a running `lookalike web`).
"""
