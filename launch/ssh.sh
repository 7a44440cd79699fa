#!/usr/bin/env bash
# One medseg_jax process per host over ssh; the first host runs the coordinator.
#   launch/ssh.sh HOSTFILE --config=configs/unet_brats.py --workdir=/shared/runs/x
# HOSTFILE: one host name per line. The repository must be at the same path on every
# host (a shared file system), and the workdir on storage all hosts see.
# MEDSEG_PORT sets the coordinator port (default 12355).
# PYTHON names the interpreter on every host (default python3, the first on the remote
# PATH), e.g. PYTHON=/shared/venv/bin/python.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "${here}/common.sh"
if [[ $# -lt 1 || ! -f "$1" ]]; then
  echo "usage: $0 HOSTFILE ARGS..." >&2
  exit 2
fi
mapfile -t hosts < <(grep -v '^[[:space:]]*\(#\|$\)' "$1")
shift
n=${#hosts[@]}
if [[ ${n} -eq 0 ]]; then
  echo "error: no hosts in the hostfile" >&2
  exit 2
fi
repo=$(cd "${here}/.." && pwd)
coordinator="${hosts[0]}:${MEDSEG_PORT:-12355}"
quoted=$(printf '%q ' "$@")
python=$(printf '%q' "${PYTHON:-python3}")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
for ((i = 0; i < n; i++)); do
  cmd="cd $(printf '%q' "${repo}") && launch/process.sh ${i} ${python} -m medseg_jax.main --coordinator_address=${coordinator} --num_processes=${n} --process_id=${i} ${quoted}"
  echo "launching on ${hosts[i]}: ${cmd}" >&2
  ssh -o BatchMode=yes "${hosts[i]}" "${cmd}" &
  pids+=($!)
done
wait_all
