"""A run's records of its processes (heartbeats, ends) and its stop request file."""

import json
import os
import threading
import time

import pytest

from medseg_jax.monitor import run_state
from medseg_jax.training import preemption

NOW = 1_000_000.0


def _process(index, heartbeat, end=None, interval=5.0, host="h"):
  return {"process": index, "host": host, "heartbeat": heartbeat, "heartbeat_seconds": interval,
          "end": None if end is None else {"reason": end[0], "exit_code": end[1],
                                           "message": end[2] if len(end) > 2 else ""}}


@pytest.mark.parametrize("processes, expected", [
    ([], None),
    ([_process(0, NOW - 1), _process(1, NOW - 20)], "running"),  # 20 s <= 3 x 5 s + 10 s
    ([_process(0, NOW - 1), _process(1, NOW - 26)], "running"),  # one silent, one alive
    ([_process(0, NOW - 26)], "lost process"),                   # killed without a record
    ([_process(0, NOW - 1, ("finished", 0)), _process(1, NOW - 1, ("finished", 0))], "finished"),
    ([_process(0, NOW - 1, ("stopped", 0)), _process(1, NOW - 1, ("stopped", 0))], "stopped"),
    ([_process(0, NOW - 1, ("lost process", 75)), _process(1, NOW - 99)], "lost process"),
    ([_process(0, NOW - 1, ("diverged", 1)), _process(1, NOW - 1, ("lost process", 75))],
     "diverged"),
    ([_process(0, NOW - 1, ("failed", 2)), _process(1, NOW - 1, ("stopped", 0))], "failed"),
    ([_process(0, NOW - 1, ("lost process", 75)), _process(1, NOW - 1)], "running"),  # ending
])
def test_a_runs_status_follows_from_its_processes_records(processes, expected):
  assert run_state.status(processes, NOW)[0] == expected


def test_the_status_says_which_process_ended_how():
  found, why = run_state.status([_process(0, NOW, ("failed", 2, "data: bad file")),
                                 _process(1, NOW, ("stopped", 0))], NOW)
  assert (found, why) == ("failed", "process 0: exit 2, data: bad file")
  found, why = run_state.status([_process(0, NOW - 100, host="gpu7")], NOW)
  assert found == "lost process" and "process 0 (gpu7) stopped without a record" in why


def test_a_process_beats_while_it_lives_then_records_its_end_once(tmp_path):
  ends = []
  life = run_state.Lifetime(str(tmp_path), 1, 2, ends.append, interval=0.05)
  with life:
    first = run_state.read_processes(str(tmp_path))[0]
    time.sleep(0.3)
    later = run_state.read_processes(str(tmp_path))[0]
    assert later["heartbeat"] > first["heartbeat"] and later["end"] is None
    assert (later["pid"], later["process"]) == (os.getpid(), 1)
    life.end("stopped", 0, "stopped by SIGTERM after step 7")
    life.end("failed", 1, "a later exit path")  # ignored: the first end counts
  record = run_state.read_processes(str(tmp_path))[0]
  assert record["end"]["reason"] == "stopped" and record["end"]["exit_code"] == 0
  assert ends == [dict(record["end"], process=1)]
  time.sleep(0.15)  # no heartbeat after the end
  assert run_state.read_processes(str(tmp_path))[0] == record


def test_process_0_drops_the_records_of_processes_an_earlier_run_had_beyond_its_count(tmp_path):
  for i in range(4):
    with run_state.Lifetime(str(tmp_path), i, 4, interval=60) as life:
      life.end("stopped", 0)
  with run_state.Lifetime(str(tmp_path), 0, 2, interval=60):
    assert [p["process"] for p in run_state.read_processes(str(tmp_path))] == [0, 1]


def test_a_half_written_or_foreign_record_is_skipped(tmp_path):
  directory = tmp_path / "processes"
  directory.mkdir()
  (directory / "0.json").write_text(json.dumps(_process(0, NOW)))
  (directory / "1.json").write_text('{"process": 1, "heartb')
  (directory / "notes.txt").write_text("not a record")
  assert [p["process"] for p in run_state.read_processes(str(tmp_path))] == [0]


def test_a_stop_request_is_acted_on_once_and_an_earlier_runs_is_removed_at_the_start(tmp_path):
  path = tmp_path / "stop_request"
  path.write_text(json.dumps({"time": 0}))  # left by an earlier run
  with run_state.Lifetime(str(tmp_path), 1, 2, interval=60):
    assert path.exists()  # only process 0 removes it
  with run_state.Lifetime(str(tmp_path), 0, 2, interval=60):
    assert not path.exists()
  asked = threading.Event()
  watcher = preemption._RequestFile(str(path), lambda name: asked.set())  # pylint: disable=protected-access
  watcher.start()
  path.touch()  # `touch WORKDIR/stop_request` asks as the dashboard does
  assert asked.wait(5) and not path.exists()
  watcher.halt()
