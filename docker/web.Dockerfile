# The web (pages, JSON API, /healthz, /metrics): Flask under waitress. No onnxruntime, TensorFlow, hnswlib or pandas.
# The base: the official image by default; any Python 3.11.4+ image with pip and the headers (CI makes one from
# Debian's packages with docker/local/base-images, as it reaches no registry).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The dependencies first, from pyproject.toml alone (an empty README stands in): a change of code or docs
# reuses this layer.
COPY pyproject.toml ./
RUN touch README.md && mkdir -p common protocol export worker web lookalike \
    && pip install . && pip uninstall --yes lookalike
COPY common common
COPY protocol protocol
COPY export export
COPY worker worker
COPY web web
COPY lookalike lookalike
RUN pip install --no-deps .
EXPOSE 8000
ENTRYPOINT ["lookalike"]
CMD ["web", "--host", "0.0.0.0", "--port", "8000"]
