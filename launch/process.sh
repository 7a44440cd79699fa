#!/usr/bin/env bash
# Runs one process of a medseg_jax group and passes its stderr on, except for the
# runtime's abort when the process loses JAX's coordination service with process 0, which
# hosts it: the client's error poll fails the moment process 0's sockets close, and the
# runtime aborts from its own thread (a C++ stack dump and SIGABRT) before any code of the
# process can act (see PeerWatch in medseg_jax/parallel/distributed.py). That abort becomes
# one `error:` line and exit code 75, as the loss of any other process ends the others.
# SIGTERM and SIGINT are passed on. The launchers start every process through this script.
#   launch/process.sh PROCESS_ID COMMAND...
set -uo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 PROCESS_ID COMMAND..." >&2
  exit 2
fi
id=$1
shift
peer_lost_exit_code=75  # medseg_jax.parallel.distributed.PEER_LOST_EXIT_CODE
marker=$(mktemp)
trap 'rm -f "${marker}"' EXIT
# The abort's first line names the lost service; it and everything after it (the stack
# dump, Python's fatal error report) are dropped. The agent's error line comes just before.
exec {err}> >(awk -v marker="${marker}" -v id="${id}" '
  /Terminating process because the JAX distributed service detected fatal errors/ &&
      /Failed to send RPC to coordination service|Socket closed|Connection reset/ {
    aborted = 1; printf "lost\n" > marker; close(marker)
  }
  /coordination_service_agent\.cc:[0-9]+\] Polled an error from coordination service/ { next }
  !aborted { print; fflush() }
  END {
    if (aborted) print "error: process " id " lost the coordination service: process 0, " \
        "which hosts it, was lost; the same command on every process restarts the run " \
        "from its newest checkpoint"
  }' >&2)
filter=$!
"$@" 2>&"${err}" &
child=$!
exec {err}>&-
trap 'kill -TERM "${child}" 2>/dev/null' TERM
trap 'kill -INT "${child}" 2>/dev/null' INT
while true; do
  wait "${child}" 2>/dev/null  # without bash's own report of a signal's end ("Aborted")
  code=$?
  kill -0 "${child}" 2>/dev/null || break  # a trapped signal interrupted the wait
done
wait "${filter}"
if [[ ${code} -ne 0 && -s "${marker}" ]]; then
  code=${peer_lost_exit_code}
fi
exit "${code}"
