# usage-service: read-only sidecar for the new-api gateway (see README.md).
#   docker build -t usage-service .
#   docker run --rm -p 3001:3001 -v new-api-data:/data:ro \
#     -e SQLITE_PATH=/data/one-api.db -e REDIS_CONN_STRING=redis://redis:6379/0 usage-service
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs (pyproject.toml names README.md as the readme).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY usage_service/ ./usage_service/
RUN pip install --no-cache-dir ".[granian]" \
    && cd / && rm -rf /src

# Non-root. The gateway's database is only ever read (and should be mounted :ro);
# the home directory is the working directory so `--demo` can create its demo database.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app
USER 10001:10001
WORKDIR /home/app

EXPOSE 3001

# Liveness only; slim has no curl, so ask with Python. Readiness (/readyz) is for orchestrators.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3001/healthz', timeout=3)"]

ENTRYPOINT ["usage-service"]
CMD ["--host", "0.0.0.0", "--port", "3001"]
