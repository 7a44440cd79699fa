"""Outputs appear whole or not at all."""

import json
import os
import stat

import pytest

from medseg_jax import files
from medseg_jax.errors import DataError


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


def test_read_json_reads_what_write_json_wrote(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"a": [1, 2]})
  assert files.read_json(path, "a test record") == {"a": [1, 2]}


def test_a_missing_json_file_is_one_line_naming_it_or_none_if_allowed(tmp_path):
  path = str(tmp_path / "none.json")
  with pytest.raises(DataError) as raised:
    files.read_json(path, "a run's record")
  assert str(raised.value) == f"{path}: not found (a run's record)"
  assert files.read_json(path, "a run's record", missing_ok=True) is None


@pytest.mark.parametrize("content", [b'{"a": 1', b"\xff\xfe not text", b""])
def test_a_json_file_that_is_not_json_is_one_line_naming_it(tmp_path, content):
  path = tmp_path / "bad.json"
  path.write_bytes(content)
  with pytest.raises(DataError) as raised:
    files.read_json(str(path), "a run's record", missing_ok=True)
  message = str(raised.value)
  assert message.startswith(f"{path}: not JSON (a run's record): ") and "\n" not in message


def test_a_json_path_that_cannot_be_read_is_one_line_naming_it(tmp_path):
  with pytest.raises(DataError, match=rf"^{tmp_path}: unreadable \(a run's record\): "):
    files.read_json(str(tmp_path), "a run's record", missing_ok=True)


def test_the_json_readers_of_a_run_name_the_file_in_one_line(tmp_path):
  """--mode=predict of a workdir without a run, and a tuner reading a run's records."""
  from medseg_jax.evaluation import predict  # pylint: disable=import-outside-toplevel
  from medseg_jax.tuning import runs  # pylint: disable=import-outside-toplevel
  with pytest.raises(DataError, match=rf"^{tmp_path}/data_info.json: not found \(.*--workdir "
                                      "must hold a training run\\)$"):
    predict.read_run_info(str(tmp_path))
  assert runs.diverged(str(tmp_path)) is None
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "test_metrics.json").write_text("{")
  with pytest.raises(DataError, match=rf"^{tmp_path}/eval/test_metrics.json: not JSON "):
    runs.metrics_on_test(str(tmp_path))
