# Sourced by the launch scripts, before they read their arguments.
# The launcher's command line and directory, which a run's manifest records (the
# dashboard's Resume runs it again); a launcher started by another keeps the first's.
export MEDSEG_LAUNCHER="${MEDSEG_LAUNCHER:-$(printf '%q ' "$0" "$@")}"
export MEDSEG_LAUNCHER_CWD="${MEDSEG_LAUNCHER_CWD:-${PWD}}"

# Waits for the processes in the `pids` array and exits with the first non-zero exit code
# among them (0 if all succeed). A signal the script traps (and forwards) interrupts
# `wait`; it then waits again for the process's own exit.
wait_all() {
  local status=0 code pid
  for pid in "${pids[@]}"; do
    while true; do
      wait "${pid}"
      code=$?
      kill -0 "${pid}" 2>/dev/null || break
    done
    if [[ ${code} -ne 0 && ${status} -eq 0 ]]; then status=${code}; fi
  done
  exit "${status}"
}
