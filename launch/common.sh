# Sourced by the launch scripts: waits for the processes in the `pids` array and exits
# with the first non-zero exit code among them (0 if all succeed).
wait_all() {
  local status=0 code pid
  for pid in "${pids[@]}"; do
    wait "${pid}"
    code=$?
    if [[ ${code} -ne 0 && ${status} -eq 0 ]]; then status=${code}; fi
  done
  exit "${status}"
}
