#!/usr/bin/env bash
# The README's "Quick start with curl" as a script: export a small MLP with torch.export, upload it, wait
# for its inspection, submit a dynamic int8 job, poll it, download the int8 model (its ETag is its sha256)
# and print how to load it.
#
#   qaas serve &                       # or make run
#   examples/curl.sh [WORK_DIR]        # files go to WORK_DIR (default: a new temporary folder)
#
# Environment: QAAS_SERVER (default http://127.0.0.1:8000), QAAS_API_KEY (sent as a Bearer token when set),
# PYTHON (a Python with torch; default: the repository's .venv/bin/python, else python3). Needs curl and jq.
set -euo pipefail

URL=${QAAS_SERVER:-http://127.0.0.1:8000}
URL=${URL%/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
AUTH=()
if [ -n "${QAAS_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $QAAS_API_KEY"); fi
curl() { command curl "${AUTH[@]}" "$@"; }

WORK=${1:-$(mktemp -d -t qaas-curl-XXXXXX)}
mkdir -p "$WORK" && cd "$WORK"
echo "working in $WORK against $URL" >&2

# A model: any torch.export program. Export with a batch of 2 or more and a dynamic batch dimension.
"$PYTHON" - <<'EOF'
import torch
model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
batch = torch.export.Dim("batch")
program = torch.export.export(model, (torch.randn(2, 64),), dynamic_shapes={"input": {0: batch}})
torch.export.save(program, "model.pt2")
EOF

# Upload it; a worker inspects it (inputs, parameters, layers) until it is ready.
MODEL=$(curl -sf -F file=@model.pt2 $URL/v1/models | jq -r .id)
until [ "$(curl -sf $URL/v1/models/$MODEL | jq -r .status)" != inspecting ]; do sleep 1; done
curl -sf $URL/v1/models/$MODEL | jq '{status, format, inspection}'

# Submit a dynamic int8 job and poll it.
JOB=$(curl -sf -H 'content-type: application/json' $URL/v1/jobs \
      -d "{\"model_id\": \"$MODEL\", \"mode\": \"dynamic\", \"backend\": \"fbgemm\"}" | jq -r .id)
until [[ "$(curl -sf $URL/v1/jobs/$JOB | jq -r .status)" =~ succeeded|failed|cancelled ]]; do sleep 1; done
curl -sf $URL/v1/jobs/$JOB | jq '{status, error, size: .metrics.size, latency: .metrics.latency}'

# Download the int8 model; the ETag is its sha256.
curl -sf -o model.int8.ts $URL/v1/jobs/$JOB/artifacts/model.int8.ts
curl -sf $URL/v1/jobs/$JOB | jq -r .load_snippet
