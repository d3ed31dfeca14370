# TTA inference server image: the project and its pinned dependencies in /opt/venv, the default model
# (models/default/*, part of the package) inside, run as a non-root user.
#
# Build and run (the build needs BuildKit, Docker's default builder since 23.0, or buildah/podman):
#   docker build -t tta-server .
#   export TTA_ADMIN_TOKEN=<a secret>                              # the bearer token of POST /reset
#   docker run --rm -p 127.0.0.1:8000:8000 -e TTA_ADMIN_TOKEN tta-server                  # CPU
#   docker run --rm -p 127.0.0.1:8000:8000 -e TTA_ADMIN_TOKEN --gpus all tta-server       # GPU: NVIDIA toolkit
#   docker run --rm -p 127.0.0.1:8000:8000 -e TTA_ADMIN_TOKEN -e TTA_METHOD=norm tta-server
# The full stack (server, Prometheus with alert rules, Grafana): docker compose -f docker/compose.yaml up.
#
# Configuration: the same TTA_ environment variables as `tta serve` everywhere (app/config.py). The image
# sets TTA_HOST=0.0.0.0 and TTA_PORT=8000, and a server listening beyond loopback refuses to start without
# TTA_ADMIN_TOKEN (or TTA_ALLOW_OPEN_ADMIN=true): give the token at run time, never in a layer. A custom model is
# a mounted file plus -e TTA_MODEL=/models/x.safetensors (its .json model card beside it). ENTRYPOINT ["tta"] and
# CMD ["serve"] are exec form, so the server is PID 1 and gets SIGTERM itself (graceful drain, TTA_SHUTDOWN_GRACE_S);
# `docker run IMAGE serve --method none` passes flags. HEALTHCHECK polls /healthz on 127.0.0.1:$TTA_PORT.
# TTA_STATE_DIR=/var/lib/tta, a volume: the adapted state is snapshotted there and restored at start; keep it with
# -v tta-state:/var/lib/tta (one volume per server).
#
# Build arguments:
#   BASE_IMAGE        python:3.11-slim (default). Any image with python3 >= 3.11 and its venv module works:
#                     e.g. a CUDA PyTorch runtime image (pytorch/pytorch:<version>-cuda<x>-cudnn9-runtime), or the
#                     debootstrap bookworm image docker/test.sh builds. The PyPI torch wheel pinned in the lock
#                     already bundles its CUDA libraries, so the slim default serves GPUs too (host driver needed).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_FIND_LINKS, PIP_NO_INDEX
#                     pip's own settings, for a mirror or proxy; PIP_NO_INDEX=1 installs from a wheelhouse only.
#   PIP_WHEELHOUSE    directory inside the build searched for wheels first (default /wheels; used only if present).
#   PIP_CERT          CA bundle path inside the build for a TLS-intercepting proxy or private index.
# Air-gapped or proxied builds (nothing of this is committed to a layer):
#   wheelhouse  make one:  pip download --only-binary=:all: -r docker/requirements.lock -d /srv/wheels
#               Docker:    docker build --build-context wheelhouse=/srv/wheels --build-arg PIP_NO_INDEX=1 .
#               buildah/podman: buildah bud --volume /srv/wheels:/wheels:ro --build-arg PIP_NO_INDEX=1 .
#   CA bundle   Docker:    docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
#               buildah/podman: --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt:ro
#               or --build-arg PIP_CERT=<path of a bundle you mounted>.
#   docker/pip-install.sh applies these; docker/test.sh is a complete worked example (buildah, no Docker engine).
#
# Layers, for caching: base + user, then the pinned dependencies (docker/requirements.lock, regenerated from
# pyproject.toml by docker/lock.sh), then the code and model (pip install --no-deps), which is all that a code
# change rebuilds.

ARG BASE_IMAGE=python:3.11-slim

# Empty unless `docker build --build-context wheelhouse=DIR` replaces it with a directory of wheels.
FROM scratch AS wheelhouse

FROM ${BASE_IMAGE}

ARG PIP_WHEELHOUSE=/wheels
ARG PIP_CERT=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=""

LABEL org.opencontainers.image.title="tta-server" \
      org.opencontainers.image.description="Image classification server that adapts online to its traffic (TENT with guards), with dynamic batching and prequential Prometheus metrics" \
      org.opencontainers.image.licenses="MIT"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_STATE_DIR=/var/lib/tta

RUN useradd --uid 10001 --user-group --no-log-init --create-home --home-dir /home/tta \
        --shell /usr/sbin/nologin tta \
    && install -d -o tta -g tta -m 0700 /var/lib/tta
# The adapted-state snapshot (README, "Persistence"): a volume, so that it outlives the container. A volume mounted
# there for the first time takes this directory's owner, so the server can write it.
VOLUME ["/var/lib/tta"]

# Dependencies: change only when docker/requirements.lock does.
COPY docker/requirements.lock docker/pip-install.sh /opt/tta-build/
RUN --mount=type=secret,id=pip_cert,target=/run/secrets/pip_cert \
    --mount=type=bind,from=wheelhouse,target=/wheels-context \
    python3 -m venv /opt/venv \
    && sh /opt/tta-build/pip-install.sh deps

# The project: code and the default model (package data), installed without dependencies.
COPY pyproject.toml README.md /opt/tta-build/src/
COPY app /opt/tta-build/src/app
COPY models /opt/tta-build/src/models
COPY bench /opt/tta-build/src/bench
RUN sh /opt/tta-build/pip-install.sh project \
    && rm -rf /opt/tta-build \
    && python -I -c "from app.config import Settings; from models.checkpoint import load_checkpoint; \
_, card = load_checkpoint(Settings().model); print('default model:', Settings().model, card.architecture)"

USER 10001:10001
WORKDIR /home/tta
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TTA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tta"]
CMD ["serve"]
