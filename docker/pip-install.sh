#!/bin/sh
# pip inside the image build (see the comment block at the top of the Dockerfile).
#
#   pip-install.sh deps      install docker/requirements.lock (every pin) into /opt/venv
#   pip-install.sh project   install the project from /opt/tta-build/src without dependencies, then `pip check`
#
# Optional inputs, all absent by default (then pip uses PyPI, or PIP_INDEX_URL, with the image's CAs):
#   wheelhouse   a directory of wheels at $PIP_WHEELHOUSE (default /wheels: `buildah bud`/`podman build`
#                --volume DIR:/wheels:ro) or at /wheels-context (`docker build --build-context wheelhouse=DIR`);
#                pip looks there first (--find-links). With PIP_NO_INDEX=1, pip looks nowhere else.
#   CA bundle    $PIP_CERT (a path inside the build), else /run/secrets/pip_cert (`docker build --secret
#                id=pip_cert,src=FILE`), else /etc/ssl/certs/host-ca.crt (`--volume FILE:/etc/ssl/certs/host-ca.crt:ro`).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_FIND_LINKS, PIP_NO_INDEX: pip's own variables,
#                passed as build args.
# None of these ends up in an image layer: mounts and secrets are not committed, build args are not ENV.
set -eu

# Build args arrive as environment variables, empty when not given: an empty one must not reach pip
# (an empty PIP_CERT is not a CA bundle, an empty PIP_NO_INDEX is not a boolean).
for name in PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_FIND_LINKS PIP_NO_INDEX; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then unset "$name"; fi
done

if [ -n "${PIP_CERT:-}" ]; then
    if [ ! -f "$PIP_CERT" ]; then
        echo "pip-install.sh: PIP_CERT=$PIP_CERT is not a file inside the build; mount it (see the Dockerfile)" >&2
        exit 2
    fi
elif [ -s /run/secrets/pip_cert ]; then
    export PIP_CERT=/run/secrets/pip_cert
elif [ -s /etc/ssl/certs/host-ca.crt ]; then
    export PIP_CERT=/etc/ssl/certs/host-ca.crt
fi
if [ -n "${PIP_CERT:-}" ]; then echo "pip-install.sh: CA bundle $PIP_CERT"; fi

links="${PIP_FIND_LINKS:-}"
for dir in "${PIP_WHEELHOUSE:-/wheels}" /wheels-context; do
    if [ -d "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
        echo "pip-install.sh: wheelhouse $dir ($(find "$dir" -maxdepth 1 -type f ! -name '.*' | wc -l) files)"
        links="$dir${links:+ $links}"
    fi
done
if [ -n "$links" ]; then
    export PIP_FIND_LINKS="$links"
fi
unset PIP_WHEELHOUSE  # not a pip option; keep pip from guessing at it
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_PROGRESS_BAR=off

pip="/opt/venv/bin/python -m pip"
case "${1:-}" in
    deps)
        $pip install --only-binary=:all: --requirement /opt/tta-build/requirements.lock
        ;;
    project)
        # --no-build-isolation: the build backend (setuptools) is pinned in the lock and already installed,
        # so this step needs no index at all.
        $pip install --no-deps --no-build-isolation /opt/tta-build/src
        $pip check
        ;;
    *)
        echo "usage: pip-install.sh deps|project" >&2
        exit 2
        ;;
esac
