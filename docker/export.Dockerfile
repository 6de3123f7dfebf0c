# The one-shot exporter: Keras ResNet50 -> ONNX with TensorFlow (CPU build) and tf2onnx, then a parity check with
# onnxruntime (the `cpu` extra's version; not the extra itself, whose hnswlib would need a compiler here).
# The base: the official image by default; any Python 3.11.4+ image with pip and the headers (CI makes one from
# Debian's packages with docker/local/base-images, as it reaches no registry).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml ./
RUN touch README.md && mkdir -p common protocol export worker web lookalike \
    && pip install ".[export]" "onnxruntime>=1.20,<2" && pip uninstall --yes lookalike
COPY common common
COPY protocol protocol
COPY export export
COPY worker worker
COPY web web
COPY lookalike lookalike
RUN pip install --no-deps .
ENTRYPOINT ["lookalike"]
CMD ["export", "--out", "/models/model.onnx", "--if-missing"]
