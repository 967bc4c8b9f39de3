#!/bin/bash
# jaxps job {{job}} on TPU VM {{tpu}}: {{workers_per_group}} host(s), {{servers}} PS server(s) beside the first host(s){{manager_note}}.
# Rendered by `jaxps launch tpu`; run it where gcloud is configured: `bash {{out_name}}`.
#
# Every host runs the same entry point as `jaxps launch local`: `jaxps launch node`, which reads
# TPU_WORKER_ID and TPU_WORKER_HOSTNAMES (from the metadata server when unset), runs a worker, and
# on the first hosts a PS server beside it (TPU hosts all have chips), with the JAXPS_* variables
# of README's "Cluster templates".
set -euo pipefail
TPU="${TPU:-{{tpu}}}"
ZONE="${ZONE:-{{zone}}}"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all{{project_flag}})

# The PS token: a fresh secret copied to every host (mode 600), never on a command line.
TOKEN_FILE="$(mktemp)"
trap 'rm -f "$TOKEN_FILE"' EXIT
od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$TOKEN_FILE"
"${GCLOUD[@]}" scp "$TOKEN_FILE" "$TPU:.jaxps-token" "${WHERE[@]}"

REMOTE=$(cat <<'REMOTE_EOF'
set -euo pipefail
chmod 600 ~/.jaxps-token
MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes
export TPU_WORKER_ID="${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google $MD/agent-worker-number)}"
export TPU_WORKER_HOSTNAMES="${TPU_WORKER_HOSTNAMES:-$(curl -sf -H Metadata-Flavor:Google $MD/worker-network-endpoints \
  | tr ',' '\n' | cut -d: -f3 | paste -sd, -)}"
exec {{node}} --scheduler tpu --token-file ~/.jaxps-token -- {{program}}
REMOTE_EOF
)
"${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command="$REMOTE"
