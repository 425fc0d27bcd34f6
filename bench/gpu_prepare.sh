#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what `bench/gpu_check.sh` carries to a lent GPU machine (device tool):
#   .whl/                     wheels the device image lacks, for its Python 3.12, at the versions .venv runs here
#   .gpu-carry/store128.tgz   the 24-subject demo store at 128 px (the throughput and study-wall sections)
# Both paths are git-ignored through .git/info/exclude. Then, in one device call:
#   run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu-carry"])      (QUALITY=1 for the 128 px benches)
# The device image's own packages (torch, numpy, scipy, pandas, matplotlib, scikit-learn, safetensors, torchmetrics,
# pyyaml, tqdm, requests, jinja2, ...) are used there; ../.library/device/KINDS.md lists them.
# Checked 2026-11-28 (no GPU): in a clean Python 3.11 venv holding torch and the image's packages that mrigen
# touches, these names installed --no-deps (as gpu_check.sh does) ran `mrigen.train` with MLflow tracking on
# SQLite and `mrigen.tune`; the 3.12 wheels themselves are first installed on a device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# mrigen's runtime needs that the image lacks (mlflow-skinny holds the tracking client, pyfunc and the SQLite store;
# the UI server and S3 / PostgreSQL clients are not used by the GPU checks), with their own missing needs.
NAMES="mlflow-skinny cachetools databricks-sdk google-auth pyasn1 pyasn1-modules cryptography cffi pycparser fastapi starlette uvicorn
gitpython gitdb smmap importlib-metadata opentelemetry-api opentelemetry-proto opentelemetry-sdk
opentelemetry-semantic-conventions pydantic pydantic-core annotated-types typing-inspection python-dotenv sqlparse
optuna alembic mako colorlog sqlalchemy nibabel nilearn isal python-calamine"
for p in /.whl/ /.gpu-carry/; do grep -qxF "$p" .git/info/exclude || echo "$p" >> .git/info/exclude; done

# Pin each name to the version installed in .venv (what CI tests); a name .venv lacks is resolved unpinned.
SPECS=$("$PY" - $NAMES <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
EOF
)
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $SPECS
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1) in .whl/"

mkdir -p .gpu-carry
if [ ! -s .gpu-carry/store128.tgz ]; then
  work=$(mktemp -d)
  "$PY" - "$work" <<'EOF'
import sys
from pathlib import Path
from mrigen.data import build_demo_store
store = build_demo_store(Path(sys.argv[1]) / "demo", subjects=24, size=128, progress=False)
(Path(sys.argv[1]) / "store").symlink_to(store.path)
print(f"store: {store}")
EOF
  tar czhf .gpu-carry/store128.tgz -C "$work" --transform 's,^store,store-128,' store
  rm -rf "$work"
fi
echo "store: $(du -sh .gpu-carry/store128.tgz | cut -f1) in .gpu-carry/store128.tgz"
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -cb .whl .gpu-carry | tail -1 | cut -f1)
total=$(( (tracked + carry) / 1048576 ))
echo "working tree + carry: ${total} MiB (the device tool takes at most 64)"
[ "$total" -lt 64 ] || { echo "error: ${total} MiB is over the device tool's 64 MiB" >&2; exit 1; }
