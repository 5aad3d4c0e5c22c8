#!/usr/bin/env bash
# The service as containers, end to end, with podman (issue 26 item 7; docs/SERVICE.md, "Containers
# with podman"). Not part of CI: it is slow (apt, pip, torch's wheels) and needs root.
#   1. podman (with the runc runtime), runc and mmdebstrap, from apt when missing;
#   2. a Debian bookworm base image made here (mmdebstrap, then podman import) that trusts the host's
#      CA bundle (HOST_CA), for machines whose HTTPS goes through a proxy with its own CA;
#   3. rib-api and rib-worker built from docker/*.Dockerfile on that base (ulimits nofile/nproc: the host's);
#   4. on the host: an S3 server (moto) with a small classifier trained here and its companion
#      manifest, and Redis (RIB_PODMAN_REDIS, default the local one, databases 7 and 8);
#   5. the API and one CPU worker as containers on the host's network, and two demo images sent
#      through them with rib-remote: uploaded, waited for, their results listed, a COCO export fetched.
# Re-runs reuse the base image and podman's build cache. Environment: PYTHON (the project's venv
# python, default .venv/bin/python), TORCH_INDEX_URL (default: pip's index; PyPI's torch is the
# CUDA build, several GB), HOST_CA, DEBIAN_MIRROR, API_PORT, S3_PORT, RIB_PODMAN_WORK (runs/podman).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
WORK=${RIB_PODMAN_WORK:-runs/podman}
CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REDIS=${RIB_PODMAN_REDIS:-redis://127.0.0.1:6379}
API_PORT=${API_PORT:-8765}
S3_PORT=${S3_PORT:-8766}
KEY=podman-stack-key
BASE=localhost/rib-debian:bookworm
VERSION=$("$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
# Limits runc may set: podman's defaults are above the hard limits of many machines, where runc fails
# with "error setting rlimit type 7 (nofile) / 6 (nproc): operation not permitted". nofile: this
# shell's hard limit; nproc: 4096 (the host's hard limit was refused too).
nproc=$(( $(ulimit -Hu) < 4096 ? $(ulimit -Hu) : 4096 ))
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")
pod() { podman --runtime runc "$@"; }
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
mkdir -p "$WORK"
WORK=$(realpath "$WORK")

step "tools"
missing=()
for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi
podman --version

step "base image $BASE"
if ! pod image exists "$BASE"; then
  mmdebstrap --variant=minbase --include=ca-certificates --aptopt='Acquire::Check-Valid-Until "false"' \
    --customize-hook="cp '$CA' \"\$1/usr/local/share/ca-certificates/host-ca.crt\" && chroot \"\$1\" update-ca-certificates" \
    bookworm "$WORK/base.tar" "$MIRROR"
  bundle=/etc/ssl/certs/ca-certificates.crt
  pod import --change "ENV PIP_CERT=$bundle" --change "ENV SSL_CERT_FILE=$bundle" \
    --change "ENV REQUESTS_CA_BUNDLE=$bundle" --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$BASE"
  rm -f "$WORK/base.tar"
fi

step "rib-api:$VERSION"
pod build "${LIMITS[@]}" --network host -f docker/api.Dockerfile --build-arg BASE_IMAGE="$BASE" \
  -t "rib-api:$VERSION" .
step "rib-worker:$VERSION (torch from ${TORCH_INDEX_URL:-the default pip index})"
pod build "${LIMITS[@]}" --network host -f docker/worker.Dockerfile --build-arg CUDA_IMAGE="$BASE" \
  --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" -t "rib-worker:$VERSION" .
pod image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'rib-(api|worker)'

step "host: S3 (moto) on :$S3_PORT, a classifier and its companions"
"$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/s3.log" 2>&1 &
S3_PID=$!
cleanup() {
  pod rm -f rib-api rib-worker >/dev/null 2>&1 || true
  kill "$S3_PID" 2>/dev/null || true
}
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=podman AWS_SECRET_ACCESS_KEY=podman AWS_DEFAULT_REGION=us-east-1
S3=http://127.0.0.1:$S3_PORT
if [ ! -f "$WORK/classifier/classifier.pth" ]; then
  "$PY" -m rib_core.cli demo-data "$WORK/demo" --set n_train=192 --set n_val=16 --set canvas=64 \
    --set 'digits=[0,1,2,3,4]' --set max_per_image=2 --set 'digit_size=[26,40]'
  "$PY" -m rib_core.cli train-classifier "$WORK/demo/train.jsonl" "$WORK/classifier" --device cpu --quiet \
    --set arch=resnet18 --set batch_size=16 --set epochs=15 --set lr=0.03 --set crop_size=64 \
    --set 'resize_long=[48,80]' --set recipe=scratch --set seed=0
fi
"$PY" - "$S3" "$WORK" <<'PYTHON'
import sys
import time
from pathlib import Path

from rib_core.data.datasets import load_manifest
from rib_core.io.storage import s3_client

endpoint, work = sys.argv[1], Path(sys.argv[2])
s3 = s3_client(endpoint)
for _ in range(50):
    try:
        s3.create_bucket(Bucket="rib")
        break
    except Exception:  # the server is still starting
        time.sleep(0.2)
s3.upload_file(str(work / "classifier" / "classifier.pth"), "rib", "models/classifier.pth")
train = load_manifest(work / "demo" / "train.jsonl")
for name in ("train.jsonl", "val.jsonl"):
    s3.upload_file(str(work / "demo" / name), "rib", f"demo/{name}")
for folder in ("images", "masks"):
    for path in sorted((work / "demo" / folder).iterdir()):
        s3.upload_file(str(path), "rib", f"demo/{folder}/{path.name}")
print(f"s3://rib/models/classifier.pth, s3://rib/demo/train.jsonl ({len(train)} companions)")
PYTHON

step "containers: the API on :$API_PORT and one CPU worker"
ENV=(-e "RIB_BROKER_URL=$REDIS/7" -e "RIB_RESULT_BACKEND=$REDIS/8" -e RIB_STORAGE_URI=s3://rib/results
     -e "RIB_S3_ENDPOINT_URL=$S3" -e "AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
     -e "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY" -e AWS_DEFAULT_REGION=us-east-1
     -e RIB_CLASSIFIER_URI=s3://rib/models/classifier.pth -e RIB_COMPANION_MANIFEST_URI=s3://rib/demo/train.jsonl
     -e "RIB_API_KEYS=$KEY" -e RIB_DEVICE=cpu -e OMP_NUM_THREADS=1
     -e 'RIB_RIB_DEFAULTS={"iterations": 5, "companions": 2, "crop_size": 64, "resize_long": [48, 96]}')
pod rm -f rib-api rib-worker >/dev/null 2>&1 || true
pod run -d --name rib-api --network host "${LIMITS[@]}" "${ENV[@]}" "rib-api:$VERSION" \
  uvicorn service.main:app --host 127.0.0.1 --port "$API_PORT"
pod run -d --name rib-worker --network host "${LIMITS[@]}" "${ENV[@]}" "rib-worker:$VERSION"
URL=http://127.0.0.1:$API_PORT
for _ in $(seq 120); do curl -fsS "$URL/healthz" >/dev/null 2>&1 && break; sleep 1; done
curl -fsS -H "X-API-Key: $KEY" "$URL/readyz"; echo
pod exec rib-api python -c "import importlib.util as u; print('torch in the API image:', u.find_spec('torch') is not None)"

step "two images end to end"
remote() { "$PY" -m rib_client --url "$URL" --api-key "$KEY" "$@"; }
for id in train_00000 train_00001; do
  labels=$(grep "\"$id\"" "$WORK/demo/train.jsonl" | "$PY" -c "import json, sys; print(','.join(json.load(sys.stdin)['labels']))")
  remote upload "$WORK/demo/images/$id.png" --labels "$labels" --wait --timeout 900 > "$WORK/$id.status.json"
  job=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['job_id'])" "$WORK/$id.status.json")
  remote results "$job" | tee "$WORK/$id.results.jsonl"
  remote export "$job" --format coco --out "$WORK/$id-coco.zip"
done
"$PY" - "$WORK" <<'PYTHON'
import json
import sys
import zipfile
from pathlib import Path

work = Path(sys.argv[1])
for id in ("train_00000", "train_00001"):
    (result,) = [json.loads(line) for line in (work / f"{id}.results.jsonl").read_text().splitlines()]
    with zipfile.ZipFile(work / f"{id}-coco.zip") as z:
        coco = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".json"))))
    print(f"{id}: {result['status']}, files {sorted(result['artifacts'])}, COCO {len(coco['annotations'])} annotation(s)")
    assert result["status"] == "done" and coco["images"]
print("podman stack: two images processed end to end")
PYTHON
pod logs --tail 5 rib-worker
