# Embed and index workers: onnxruntime (EXTRA=cpu; EXTRA=gpu for onnxruntime-gpu with its CUDA libraries) and
# hnswlib, built without -march=native so that the image runs on any x86-64. No TensorFlow.
# The base: the official image by default; any Python 3.11.4+ image with pip and the headers (CI makes one from
# Debian's packages with docker/local/base-images, as it reaches no registry).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HNSWLIB_NO_NATIVE=1
WORKDIR /app
# The dependencies first, from pyproject.toml alone (an empty README stands in): a change of code or docs
# reuses these layers. The compiler that hnswlib's build needs goes again in the same layer, and the CPU and GPU
# images share it: only onnxruntime differs, in the layer after.
COPY pyproject.toml ./
RUN apt-get update && apt-get install --yes --no-install-recommends g++ \
    && touch README.md && mkdir -p common protocol export worker web lookalike && pip install ".[worker]" \
    && pip uninstall --yes lookalike \
    && apt-get purge --yes g++ && apt-get autoremove --yes && rm -rf /var/lib/apt/lists/*
ARG EXTRA=cpu
RUN pip install ".[$EXTRA]" && pip uninstall --yes lookalike
COPY common common
COPY protocol protocol
COPY export export
COPY worker worker
COPY web web
COPY lookalike lookalike
RUN pip install --no-deps .
ENTRYPOINT ["lookalike"]
CMD ["worker", "embed"]
