#!/usr/bin/env bash
# Installs medseg_jax (editable, with the `medseg-jax` command) and what it needs into the
# Python that runs it (${PYTHON:-python3}): the runtime and test dependencies, then the
# ONNX extra (an ONNX graph in exported model files, --engine=onnxruntime).
# `bash install.sh --no-onnx` skips the extra.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
if [[ "${1:-}" == "--no-onnx" ]]; then
  "${PIP[@]}" -e ".[dev]"
else
  "${PIP[@]}" -e ".[dev,onnx]"
  # jax2onnx's declared dependencies conflict with the pinned orbax-checkpoint; see the file.
  "${PIP[@]}" --no-deps -r requirements-onnx-nodeps.txt
fi
