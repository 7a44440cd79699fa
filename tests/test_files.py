"""Outputs appear whole or not at all."""

import json
import os
import stat

import pytest

from medseg_jax import files


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
  path = tmp_path / "out.json"
  files.write_json(str(path), {"a": 1})
  with pytest.raises(RuntimeError):
    with files.atomic_path(str(path)) as tmp:
      with open(tmp, "w") as f:
        f.write("{half")
      raise RuntimeError("interrupted")
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["out.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
  path = tmp_path / "m.json"
  files.write_json(str(path), [])
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  for step in (1, 2, 3, 4):
    files.append_jsonl(path, {"step": step})
  files.truncate_jsonl(path, 2)
  with open(path) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
