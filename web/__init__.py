"""The Flask front end: it enqueues uploads and polls job results; it never imports onnxruntime or hnswlib."""
