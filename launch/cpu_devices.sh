#!/usr/bin/env bash
# Runs medseg_jax on this machine's CPU split into N simulated devices, to try
# data-parallel training without accelerators.
#   launch/cpu_devices.sh N --config=configs/quickstart.py --workdir=runs/q8 [--config.key=value ...]
# PYTHON names the interpreter (default python3, the first on PATH), e.g.
# PYTHON=/path/venv/bin/python.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_DEVICES ARGS..." >&2
  exit 2
fi
n=$1
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${n}"
echo "launching: ${python} -m medseg_jax.main $* on ${n} CPU devices" >&2
"${python}" -m medseg_jax.main "$@"
