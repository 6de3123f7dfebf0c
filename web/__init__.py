"""The Flask front end: search form, job pages, results gallery, catalogue loads and the JSON API.

It only enqueues and polls through Redis; it never imports onnxruntime, hnswlib or TensorFlow.
"""
