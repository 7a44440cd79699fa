#!/usr/bin/env bash
# Starts N processes of medseg_jax on this machine, joined over 127.0.0.1, to try
# multi-host training on one machine (and for the tests).
#   launch/local.sh N --config=configs/quickstart.py --workdir=runs/mp [--config.key=value ...]
# CPU_DEVICES_PER_PROCESS=K gives each process K simulated CPU devices.
# MEDSEG_PORT picks the coordinator port (default: a free one).
# PYTHON names the interpreter (default python3, the first on PATH), e.g.
# PYTHON=/path/venv/bin/python.
# Exits with the first non-zero exit code of the processes (0 if all succeed); each runs
# through launch/process.sh.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "${here}/common.sh"
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES ARGS..." >&2
  exit 2
fi
n=$1
shift
cd "${here}/.."
python=${PYTHON:-python3}
port=${MEDSEG_PORT:-$("${python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ -n "${CPU_DEVICES_PER_PROCESS:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS}"
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
for ((i = 0; i < n; i++)); do
  args=(--coordinator_address="127.0.0.1:${port}" --num_processes="${n}" --process_id="${i}" "$@")
  echo "launching process ${i}/${n}: ${python} -m medseg_jax.main ${args[*]}" >&2
  "${here}/process.sh" "${i}" "${python}" -m medseg_jax.main "${args[@]}" &
  pids+=($!)
done
wait_all
