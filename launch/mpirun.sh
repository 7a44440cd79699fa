#!/usr/bin/env bash
# Open MPI: one medseg_jax process per slot of a hostfile (usually one per GPU).
#   launch/mpirun.sh HOSTFILE NUM_PROCESSES --config=configs/unet_brats.py --workdir=runs/x
# jax.distributed reads the rank and size from OMPI_COMM_WORLD_* and gives each process
# the GPU of its local rank. The working directory must be the same path on every host.
# PYTHON names the interpreter on every host (default python3, the first on PATH), e.g.
# PYTHON=/shared/venv/bin/python.
set -uo pipefail
if [[ $# -lt 2 || ! -f "$1" || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 HOSTFILE NUM_PROCESSES ARGS..." >&2
  exit 2
fi
hostfile=$1
n=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
echo "launching ${n} processes from ${hostfile}: mpirun ${python} -m medseg_jax.main $*" >&2
mpirun --hostfile "${hostfile}" -np "${n}" -x PATH -x PYTHONPATH -x LD_LIBRARY_PATH \
  --wdir "$(pwd)" "${python}" -m medseg_jax.main "$@"
exit $?
