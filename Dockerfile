# The proxy's image: client_proxy/, its locked dependencies (requirements/proxy.txt), the
# example compositions and pipelines (examples/) and the feature rows (features/), nothing else.
# Triton runs from NVIDIA's own image (docker-compose.yml). For a build that is the same tomorrow, pin the base images by digest too: FROM python:3.11-slim-bookworm@sha256:<digest>
# (docker buildx imagetools inspect python:3.11-slim-bookworm prints it).

FROM python:3.11-slim-bookworm AS build
# Every package at the version the lock names, checked against its hashes; binary wheels only,
# so no compiler is needed.
COPY requirements/proxy.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.txt

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin proxy
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY client_proxy ./client_proxy
# The example compositions and pipelines (the wine models), which compose and k8s point the proxy at.
COPY examples ./examples
# The Iris and wine rows by key (features/*.csv), which k8s's features Job loads into the store.
COPY features ./features
USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    PROXY_HOST=0.0.0.0 \
    PROXY_PORT=9000 \
    PROXY_GRPC_PORT=9001 \
    PYTHONUNBUFFERED=1
EXPOSE 9000 9001
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/health/live', timeout=2)"]
CMD ["python", "-m", "client_proxy"]
