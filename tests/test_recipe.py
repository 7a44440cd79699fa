"""The whole recipe through its command on a tiny synthetic dataset: plan, folds, choice,
one ensemble file, the report; resumable."""

import json
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np

from helpers import REPO, env_with_devices
from medseg_jax.data import synthetic


def recipe(*args):
  return subprocess.run([sys.executable, "-m", "medseg_jax.recipe", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900, env=env_with_devices(1))


def test_the_recipe_plans_cross_validates_chooses_and_exports_one_file(tmp_path):
  root = synthetic.write_synthetic_decathlon(str(tmp_path / "Task"), num_training=6,
                                             num_test=1, shape=(32, 32, 8))
  args = [f"--data={root}", f"--workdir={tmp_path / 'recipe'}", "--configurations=2d",
          "--num_folds=2", "--memory=1", "--num_devices=1", "--override=train.num_steps=4"]
  proc = recipe(*args)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  out = tmp_path / "recipe"
  for name in ("plans/plan_2d.py", "cv_2d/crossval.json", "best.json",
               "model.zip", "recipe.md", "recipe.png", "recipe_state.json"):
    assert (out / name).exists(), name
  assert not (out / "plans" / "plan_3d.py").exists()  # only the configurations asked for
  best = json.loads((out / "best.json").read_text())
  assert best["chosen"] == [str(out / "cv_2d")]
  cv = json.loads((out / "cv_2d" / "crossval.json").read_text())
  with zipfile.ZipFile(out / "model.zip") as archive:
    index = json.loads(archive.read("medseg_model.json"))
    assert index["kind"] == "ensemble" and index["summary"]["members"] == 2
    for k in (0, 1):  # each fold carries its configuration's out-of-fold decisions
      member = zipfile.ZipFile(archive.open(f"members/{k}.zip"))
      evaluation = json.loads(member.read("config.json"))["evaluation"]
      assert evaluation["mirror"] == cv["mirroring"]["mirror"]
      assert evaluation["largest_component_foreground"] == cv["postprocessing"]["foreground"]
  report = (out / "recipe.md").read_text()
  assert f"| 2d | 2 | {cv['folds'][0]['dice_foreground']:.4f} /" in report
  state = json.loads((out / "recipe_state.json").read_text())
  assert set(state["seconds"]) == {"plan", "folds", "choose", "export", "report"}
  # the file predicts a volume of the dataset
  image = sorted((tmp_path / "Task" / "imagesTs").iterdir())[0]
  predicted = subprocess.run([sys.executable, "-m", "medseg_jax.main", "--mode=predict",
                              f"--model={out / 'model.zip'}", f"--input={image}",
                              f"--output={tmp_path / 'pred.nii.gz'}"], cwd=REPO,
                             capture_output=True, text=True, timeout=300,
                             env=env_with_devices(1))
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  labels = np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj)
  assert labels.shape == nib.load(image).shape[:3]
  again = recipe(*args)  # everything is done: nothing trains or exports again
  assert again.returncode == 0 and (out / "recipe.md").read_text().startswith("# Recipe")
  assert json.loads((out / "cv_2d" / "crossval.json").read_text()) == cv


def test_a_dataset_without_dataset_json_is_one_line(tmp_path):
  proc = recipe(f"--data={tmp_path}", f"--workdir={tmp_path / 'out'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --data={tmp_path}: no dataset.json there")
  assert not (tmp_path / "out").exists()


def test_an_unknown_configuration_is_one_line_and_writes_nothing(tmp_path):
  root = synthetic.write_synthetic_decathlon(str(tmp_path / "Task"), num_training=2,
                                             num_test=0, shape=(8, 8, 4))
  proc = recipe(f"--data={root}", f"--workdir={tmp_path / 'out'}", "--configurations=2d,4d")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --configurations=2d,4d: choose from 2d,3d")
  assert not (tmp_path / "out").exists()
