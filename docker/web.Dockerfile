# The web (pages, JSON API, /healthz, /metrics): Flask under waitress. No onnxruntime, TensorFlow, hnswlib or pandas.
FROM python:3.11-slim
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
