#!/usr/bin/env bash
# docker/test.sh (`make docker-test`): build the project's Dockerfile for real and run the image, on a machine
# without a Docker engine, as root, with buildah (chroot isolation) and podman.
#
#   1. base image   localhost/tta-base:bookworm, a debootstrap'ed Debian bookworm with python3 (3.11), venv, pip,
#                   CA certificates; built once and kept (podman image exists), ~2 min the first time.
#   2. wheelhouse   the pinned wheels of docker/requirements.lock, downloaded on the host by pip into
#                   $TTA_WHEELHOUSE (default /var/cache/tta-wheelhouse) and kept: later runs reuse them.
#   3. build        buildah bud --isolation chroot --build-arg BASE_IMAGE=localhost/tta-base:bookworm, with the
#                   wheelhouse mounted at /wheels and the host's CA bundle at /etc/ssl/certs/host-ca.crt (pip inside
#                   the build uses both: docker/pip-install.sh). Index pages still come from PyPI through the proxy,
#                   the wheels from the wheelhouse; TTA_DOCKER_TEST_OFFLINE=1 builds with PIP_NO_INDEX=1 instead.
#   4. inspect      entrypoint, command, user, exposed port, TTA_HOST, healthcheck of the built image.
#   5. run          the image's own entrypoint + command in a working container (buildah from + buildah run: chroot
#                   isolation shares the host's loopback): first without TTA_ADMIN_TOKEN, which it must refuse
#                   (exit status 2: it listens on 0.0.0.0), then with TTA_ADMIN_TOKEN=<a random token> and
#                   TTA_PORT=<free port>; GET /readyz, the image's HEALTHCHECK command, POST /predict with a real
#                   labelled JPEG, GET /metrics, POST /reset without the token (401) and with it (200).
#   6. stop         SIGTERM to the server process (buildah run does not forward signals), which must exit 0 in time.
# Cleanup (trap): the working container, the built image and the build's intermediate images; the base image and
# the wheelhouse are kept on purpose (remove them with `podman rmi localhost/tta-base:bookworm` and
# `rm -rf /var/cache/tta-wheelhouse`).
#
# Needs: root, Debian/Ubuntu apt (debootstrap, podman and buildah are installed when missing), python3 with pip on
# the host, network for apt/PyPI (or a filled wheelhouse and the base image). The image holds CUDA torch (~6 GB
# installed), so the first run takes some minutes and ~20 GB of disk (3 GB of wheels kept, ~14 GB more at the peak
# of the build, checked before it starts); later runs reuse the base and the wheels.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_image="${TTA_BASE_IMAGE:-localhost/tta-base:bookworm}"
wheelhouse="${TTA_WHEELHOUSE:-/var/cache/tta-wheelhouse}"
ca_bundle="${TTA_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
offline="${TTA_DOCKER_TEST_OFFLINE:-0}"
reuse_image="${TTA_DOCKER_TEST_IMAGE:-}"  # debugging: test this already built image (stages 1-3 skipped, image kept)
keep_image="${TTA_DOCKER_TEST_KEEP:-0}"    # debugging: 1 keeps the built image
image="${reuse_image:-localhost/tta-server:docker-test-$$}"
ready_timeout=240
stop_timeout=60

started=$(date +%s)
stage_started=$started
stage() {  # stage NAME: print the time the previous stage took and start a new one
    local now
    now=$(date +%s)
    if [ -n "${stage_name:-}" ]; then
        printf '=== %-10s done in %4d s (total %4d s)\n' "$stage_name" $((now - stage_started)) $((now - started))
    fi
    stage_name="$1"
    stage_started=$now
    if [ "$1" != end ]; then printf '=== %s\n' "$1"; fi
}
fail() { echo "docker/test.sh: FAIL: $*" >&2; exit 1; }

workdir="$(mktemp -d /tmp/tta-docker-test.XXXXXX)"
container=""
run_pid=""
server_pid=""
dangling_before="unknown"
containers_before="unknown"
cleanup() {
    local status=$?
    set +e
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid"; fi
    if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then kill -KILL "$run_pid"; wait "$run_pid" 2>/dev/null; fi
    if [ -n "$container" ]; then buildah rm "$container" >/dev/null 2>&1; fi
    if [ -z "$reuse_image" ] && [ "$keep_image" != 1 ] && buildah images --quiet "$image" >/dev/null 2>&1; then
        buildah rmi --force "$image" >/dev/null 2>&1
    elif buildah images --quiet "$image" >/dev/null 2>&1; then
        echo "kept image $image"
    fi
    # Intermediate images of this build (the empty `wheelhouse` stage): dangling ones that were not there before.
    # Working containers this run left: buildah 1.28 leaves one behind for the empty `FROM scratch` stage.
    if [ "$containers_before" != unknown ]; then
        for id in $(buildah containers --all --format '{{.ContainerID}}' 2>/dev/null); do
            case " $containers_before " in *" $id "*) ;; *) buildah rm "$id" >/dev/null 2>&1 ;; esac
        done
    fi
    if [ "$dangling_before" != unknown ]; then
        for id in $(buildah images --quiet --filter dangling=true 2>/dev/null); do
            case " $dangling_before " in *" $id "*) ;; *) buildah rmi "$id" >/dev/null 2>&1 ;; esac
        done
    fi
    if [ -n "${rootfs:-}" ]; then rm -rf "$rootfs"; fi
    if [ $status -ne 0 ] && [ -s "$workdir/server.log" ]; then
        echo "--- server log (last 40 lines)"; tail -n 40 "$workdir/server.log"
    fi
    rm -rf "$workdir"
    echo "docker/test.sh: cleaned up (kept: base image $base_image, wheelhouse $wheelhouse)"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------------- 0. tools
stage tools
[ "$(id -u)" -eq 0 ] || fail "run as root (debootstrap, buildah and podman need it here)"
missing=()
for tool in debootstrap podman buildah; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v python3 >/dev/null || fail "python3 is needed on the host (wheelhouse download, test requests)"
echo "buildah $(buildah --version | awk '{print $3}'), podman $(podman --version | awk '{print $3}')"
dangling_before="$(buildah images --quiet --filter dangling=true 2>/dev/null | tr '\n' ' ')"
containers_before="$(buildah containers --all --format '{{.ContainerID}}' 2>/dev/null | tr '\n' ' ')"

if [ -z "$reuse_image" ]; then  # stages 1-3, skipped when TTA_DOCKER_TEST_IMAGE names an image to test
# The build holds the CUDA torch venv (~6 GB) in the working container and again in the committed layer: ~14 GB
# measured at the peak. Out of disk, buildah fails late and obscurely ("no space left on device" while committing).
storage="$(buildah info --format '{{.store.GraphRoot}}')"
mkdir -p "$storage"
free_gb=$(($(df --output=avail -B1G "$storage" | tail -n 1)))
need_gb="${TTA_DOCKER_TEST_NEED_GB:-16}"
[ "$free_gb" -ge "$need_gb" ] || fail "only $free_gb GB free on the disk of $storage; building the image needs" \
    "about $need_gb GB (free some space, or set TTA_DOCKER_TEST_NEED_GB to try anyway)"
echo "disk: $free_gb GB free for $storage (about $need_gb GB needed)"
# ---------------------------------------------------------------------------------------------------- 1. base
stage base
if podman image exists "$base_image"; then
    echo "reusing $base_image"
else
    # The Debian mirror apt uses here (deb822 sources or sources.list), else deb.debian.org.
    mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/\{0,1\}[[:space:]]*$/\1/p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)"
    if [ -z "$mirror" ]; then
        mirror="$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"
    echo "debootstrap bookworm from $mirror"
    rootfs="$workdir/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 \
        || { tail -n 30 "$workdir/debootstrap.log"; fail "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet - "$base_image" >/dev/null
    rm -rf "$rootfs"
    rootfs=""
    echo "imported $base_image"
fi

# ---------------------------------------------------------------------------------------------------- 2. wheels
stage wheelhouse
mkdir -p "$wheelhouse"
# Wheels for the image's python (CPython 3.11, glibc 2.36), whatever the host's python is. A stamp named after the
# lock's checksum marks a wheelhouse complete for that lock, so a warm run skips pip altogether.
stamp="$wheelhouse/.complete-$(cksum <"$repo/docker/requirements.lock" | cut -d' ' -f1)"
if [ -f "$stamp" ]; then
    echo "reusing $wheelhouse (complete for this docker/requirements.lock)"
else
    platforms=()
    for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    nice -n 19 python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp "${platforms[@]}" \
        --requirement "$repo/docker/requirements.lock" --dest "$wheelhouse" >"$workdir/pip-download.log" 2>&1 \
        || { grep -v 'is ignored' "$workdir/pip-download.log" | tail -n 30; fail "pip download into $wheelhouse failed"; }
    touch "$stamp"
fi
echo "$wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1)"

# ---------------------------------------------------------------------------------------------------- 3. build
stage build
build_args=(--build-arg "BASE_IMAGE=$base_image")
if [ "$offline" = 1 ]; then build_args+=(--build-arg PIP_NO_INDEX=1); fi
volumes=(--volume "$wheelhouse:/wheels:ro")
if [ -s "$ca_bundle" ]; then volumes+=(--volume "$ca_bundle:/etc/ssl/certs/host-ca.crt:ro"); fi
echo "buildah bud ${build_args[*]} ${volumes[*]} -t $image"
nice -n 19 buildah bud --isolation chroot --format docker --pull=never "${build_args[@]}" "${volumes[@]}" \
    --file "$repo/Dockerfile" --tag "$image" "$repo" >"$workdir/build.log" 2>&1 \
    || { tail -n 60 "$workdir/build.log"; fail "buildah bud failed (log above)"; }
grep -E '^(STEP|\[[0-9]/[0-9]\] STEP|pip-install.sh|default model)' "$workdir/build.log" | cut -c1-150 || true
if grep -qE 'SSLError|CERTIFICATE_VERIFY_FAILED' "$workdir/build.log"; then
    grep -E 'SSLError|CERTIFICATE_VERIFY_FAILED' "$workdir/build.log" | head -n 5
    fail "pip inside the build did not trust the proxy: the CA bundle was not used"
fi
grep -q 'pip-install.sh: wheelhouse /wheels' "$workdir/build.log" || fail "the build did not see the wheelhouse"
echo "image size: $(buildah images --format '{{.Size}}' "$image")"
fi  # stages 1-3

# ---------------------------------------------------------------------------------------------------- 4. inspect
stage inspect
buildah inspect --type image "$image" >"$workdir/inspect.json"
# One shell-quoted assignment per line for each of these:
entrypoint="" cmd="" user="" ports="" image_env="" healthcheck=""
argv=()
health_argv=()
eval "$(python3 - "$workdir/inspect.json" <<'PY'
import json, shlex, sys
image = json.load(open(sys.argv[1]))
config, docker = image["OCIv1"]["config"], image["Docker"]["config"]
health = (docker.get("Healthcheck") or {}).get("Test") or []
values = {
    "entrypoint": json.dumps(config.get("Entrypoint")),
    "cmd": json.dumps(config.get("Cmd")),
    "user": config.get("User", ""),
    "ports": " ".join(sorted(config.get("ExposedPorts") or {})),
    "image_env": " ".join(config.get("Env") or []),
    "healthcheck": json.dumps(health),
}
for name, value in values.items():
    print(f"{name}={shlex.quote(value)}")
print("argv=(" + " ".join(shlex.quote(a) for a in (config.get("Entrypoint") or []) + (config.get("Cmd") or [])) + ")")
# Docker's HEALTHCHECK test: ["CMD", args...] (exec form) or ["CMD-SHELL", "command"].
if health[:1] == ["CMD"]:
    print("health_argv=(" + " ".join(shlex.quote(a) for a in health[1:]) + ")")
elif health[:1] == ["CMD-SHELL"]:
    print("health_argv=(/bin/sh -c " + shlex.quote(health[1]) + ")")
else:
    print("health_argv=()")
PY
)"
echo "entrypoint $entrypoint  cmd $cmd  user $user  ports $ports"
echo "healthcheck $healthcheck"
[ "$entrypoint" = '["tta"]' ] || fail "entrypoint is $entrypoint, expected [\"tta\"] (exec form)"
[ "$cmd" = '["serve"]' ] || fail "cmd is $cmd, expected [\"serve\"]"
case "$user" in "" | root | 0 | 0:*) fail "the image runs as root (User=$user)" ;; esac
case " $ports " in *" 8000/tcp "*) ;; *) fail "port 8000 is not exposed ($ports)" ;; esac
case " $image_env " in *" TTA_HOST=0.0.0.0 "*) ;; *) fail "TTA_HOST=0.0.0.0 is not set in the image ($image_env)" ;; esac
case " $image_env " in *" TTA_ADMIN_TOKEN="* | *" TTA_ALLOW_OPEN_ADMIN="*)
    fail "the image sets TTA_ADMIN_TOKEN or TTA_ALLOW_OPEN_ADMIN: a token in a layer is no secret" ;;
esac
case "$healthcheck" in *healthz*) ;; *) fail "no HEALTHCHECK on /healthz ($healthcheck)" ;; esac
[ ${#health_argv[@]} -gt 0 ] || fail "cannot read the HEALTHCHECK command ($healthcheck)"

# ---------------------------------------------------------------------------------------------------- 5. run
stage run
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
container="$(buildah from --pull=never --name "tta-docker-test-$$" "$image")"
# Without a token the server must refuse to listen on the image's 0.0.0.0. The status is read inside the container
# (not through buildah run), and timeout stops a server that started after all.
buildah run --isolation chroot --env "TTA_PORT=$port" "$container" -- \
    /bin/sh -c 'timeout 120 "$@"; echo "exit status $?"' sh "${argv[@]}" >"$workdir/refused.log" 2>&1 || true
if ! grep -qx 'exit status 2' "$workdir/refused.log" || ! grep -q 'without TTA_ADMIN_TOKEN' "$workdir/refused.log"; then
    cat "$workdir/refused.log"
    fail "without TTA_ADMIN_TOKEN the image's server did not refuse to start (exit status 2, log above)"
fi
echo "without TTA_ADMIN_TOKEN: refused to start, exit status 2"
admin_token="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
echo "container $container: ${argv[*]} with TTA_PORT=$port and a TTA_ADMIN_TOKEN"
buildah run --isolation chroot --env "TTA_PORT=$port" --env "TTA_ADMIN_TOKEN=$admin_token" "$container" -- \
    "${argv[@]}" >"$workdir/server.log" 2>&1 &
run_pid=$!

descendants() {  # every process below PID $1
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
deadline=$(($(date +%s) + ready_timeout))
until curl -fsS "http://127.0.0.1:$port/readyz" >"$workdir/readyz.json" 2>/dev/null; do
    kill -0 "$run_pid" 2>/dev/null || { cat "$workdir/server.log"; fail "the server exited before it was ready"; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "/readyz did not answer 200 within $ready_timeout s"
    sleep 1
done
echo "GET /readyz: $(cat "$workdir/readyz.json")"
# The server process: below `buildah run`, the one whose command line is the image's entrypoint + command.
for pid in $(descendants "$run_pid"); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "/${argv[0]} ${argv[*]:1}"; then server_pid=$pid; fi
done
[ -n "$server_pid" ] || { ps -o pid,ppid,args --forest -g "$(ps -o sid= -p "$run_pid")" || true; fail "server pid not found"; }
server_uid="$(awk '/^Uid:/ {print $2}' "/proc/$server_pid/status")"
echo "server pid $server_pid ($(tr '\0' ' ' <"/proc/$server_pid/cmdline")), uid $server_uid"
[ "$server_uid" != 0 ] || fail "the server runs as root"

curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || fail "GET /healthz failed"
buildah run --isolation chroot --env "TTA_PORT=$port" "$container" -- "${health_argv[@]}" \
    || fail "the image's HEALTHCHECK command failed against the running server"
echo "HEALTHCHECK command: ok"

# One real labelled image: a CIFAR-10 test JPEG from ../shared when present, else a generated PNG.
python3 - "${TTA_SHARED_DIR:-$repo/../shared}/data/cifar10-jpeg/test.zip" "$workdir" <<'PY'
import pathlib, struct, sys, zipfile, zlib
archive, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if archive.is_file():
    with zipfile.ZipFile(archive) as z:
        members = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        classes = sorted({m.split("/")[-2] for m in members})
        member = next(m for m in members if m.split("/")[-2] == "cat")
        (out / "image.jpg").write_bytes(z.read(member))
        name, label = "image.jpg", classes.index("cat")
else:  # a 32x32 RGB PNG written by hand (no Pillow on the host needed)
    rows = b"".join(b"\x00" + b"".join(bytes((x * 8, y * 8, 128)) for x in range(32)) for y in range(32))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (out / "image.png").write_bytes(png)
    name, label = "image.png", 3
(out / "image.name").write_text(name)
(out / "image.label").write_text(str(label))
PY
image_file="$workdir/$(cat "$workdir/image.name")"
label="$(cat "$workdir/image.label")"
curl -fsS -F "files=@$image_file" -F "labels=$label" "http://127.0.0.1:$port/predict" >"$workdir/predict.json" \
    || fail "POST /predict failed"
python3 - "$workdir/predict.json" "$label" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
(prediction,) = answer["predictions"]
assert {"id", "class_index", "class_name", "confidence", "entropy", "top_k"} <= prediction.keys(), prediction
print(f"POST /predict (label {sys.argv[2]}): {prediction['class_name']} ({prediction['class_index']}), "
      f"confidence {prediction['confidence']:.3f}, adaptation_step {answer['adaptation_step']}")
PY
curl -fsS "http://127.0.0.1:$port/metrics" >"$workdir/metrics.txt" || fail "GET /metrics failed"
for series in 'tta_predictions_total 1.0' 'tta_labels_total{model="adapted"} 1.0' \
    'tta_requests_total{route="/predict",status="200"} 1.0'; do
    grep -qF "$series" "$workdir/metrics.txt" || fail "/metrics lacks '$series'"
done
echo "GET /metrics: $(grep -c '^tta_' "$workdir/metrics.txt") tta_ samples, tta_predictions_total 1"
reset_status="$(curl -sS -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/reset")"
[ "$reset_status" = 401 ] || fail "POST /reset without the token answered $reset_status, expected 401"
curl -fsS -X POST -H "Authorization: Bearer $admin_token" "http://127.0.0.1:$port/reset" >/dev/null \
    || fail "POST /reset with the token failed"
echo "POST /reset: 401 without the token, 200 with it"

# ---------------------------------------------------------------------------------------------------- 6. stop
stage stop
kill -TERM "$server_pid"
deadline=$(($(date +%s) + stop_timeout))
while kill -0 "$run_pid" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the server did not exit within $stop_timeout s of SIGTERM"
    sleep 0.5
done
set +e
wait "$run_pid"
exit_status=$?
set -e
run_pid=""
server_pid=""
tail -n 4 "$workdir/server.log"
if [ "$exit_status" -ne 0 ] && grep -q 'subprocess exited on terminated' "$workdir/server.log"; then
    fail "the server shut down but then died of the SIGTERM itself (uvicorn re-raises it after a graceful" \
        "shutdown): \`tta serve\` must exit 0 on SIGTERM, e.g. by installing a SIGTERM handler that exits 0" \
        "before uvicorn.run (uvicorn restores and re-raises to it)"
fi
[ "$exit_status" -eq 0 ] || fail "the server exited with status $exit_status after SIGTERM"
echo "SIGTERM: the server exited with status 0"

stage end
echo "docker/test.sh: PASS in $(($(date +%s) - started)) s"
