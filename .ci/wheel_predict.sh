#!/usr/bin/env bash
# The package as a user installs it: a fresh virtualenv with only the built wheel and its
# dependencies (with the ONNX extra) trains the quickstart for a few steps, exports the run
# as a model file and predicts from it with both engines, in a directory that is not the
# repository; then serves the run in the dashboard.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Built from a copy of what the wheel holds, so the build leaves nothing in the repository.
mkdir -p "$WORK/source/benchmarks"
cp "$REPO"/{pyproject.toml,README.md,requirements.txt,requirements-onnx.txt,requirements-dev.txt} \
  "$WORK/source/"
cp "$REPO/benchmarks/requirements.txt" "$WORK/source/benchmarks/"
cp -r "$REPO/medseg_jax" "$WORK/source/"
find "$WORK/source" -name __pycache__ -prune -exec rm -rf {} +
python3 -m pip wheel --disable-pip-version-check --no-deps --no-build-isolation -q \
  -w "$WORK/wheels" "$WORK/source"
python3 -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "$(ls "$WORK"/wheels/medseg_jax-*.whl)[onnx]"
"${PIP[@]}" --no-deps -r "$REPO/requirements-onnx-nodeps.txt"
cp "$REPO/configs/quickstart.py" "$WORK/"
cd "$WORK"
export PATH="$WORK/venv/bin:$PATH"
unset PYTHONPATH
medseg-jax --config=quickstart.py --workdir=run --config.train.num_steps=4 \
  --config.data.synthetic_volumes=6
medseg-jax --mode=export --workdir=run --output=model.zip
image="$(ls run/data/imagesTr/*.nii.gz | head -1)"
for engine in jax onnxruntime; do
  medseg-jax --mode=predict --model=model.zip --engine="$engine" --input="$image" \
    --output="pred_$engine.nii.gz"
done
python - <<'PY'
import nibabel as nib, numpy as np
jax_labels, ort_labels = (np.asarray(nib.load(f"pred_{e}.nii.gz").dataobj)
                          for e in ("jax", "onnxruntime"))
agree = float(np.mean(jax_labels == ort_labels))
print(f"wheel in a fresh virtualenv: both engines predicted {jax_labels.shape}; "
      f"labels agree on {agree:.4%} of voxels")
assert jax_labels.shape == ort_labels.shape and agree > 0.999, agree
PY
# The dashboard from the wheel's own page files, over the run trained above.
python - <<'PY'
import json, re, subprocess, urllib.request
server = subprocess.Popen(["medseg-dashboard", "."], stdout=subprocess.PIPE, text=True)
try:
  url = re.search(r"http://\S+", server.stdout.readline()).group(0)
  for path in ("", "run/run", "static/dashboard.js", "static/chart.js", "api/curves/run"):
    with urllib.request.urlopen(url + path, timeout=30) as response:
      assert response.status == 200, path
  with urllib.request.urlopen(url + "api/runs", timeout=30) as response:
    rows = json.load(response)
  assert [(r["name"], r["status"]) for r in rows] == [("run", "finished")], rows
  print("wheel in a fresh virtualenv: the dashboard serves its pages and lists the run")
finally:
  server.terminate()
PY
