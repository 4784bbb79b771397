# The proxy's image: client_proxy/ and its pinned dependencies (pyproject.toml), nothing else.
# Triton runs from NVIDIA's own image (docker-compose.yml).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client_proxy ./client_proxy
# Wheels for the project and every dependency; only binary wheels, so no compiler is needed.
RUN pip wheel --no-cache-dir --only-binary=:all: --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin proxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/iris_triton_msa-*.whl \
    && rm -rf /wheels
USER 10001
ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=9000 \
    PYTHONUNBUFFERED=1
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/health', timeout=2)"]
CMD ["python", "-m", "client_proxy"]
