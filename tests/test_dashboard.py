"""The dashboard's reading of runs (status, rows, curves) and every HTTP endpoint of a
real server, the refusals included, over run directories written by the tests."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helpers import REPO
from medseg_jax.dashboard import curves, runs

RECORDS = [
    {"step": 2, "loss": 1.0, "learning_rate": 0.1, "slices_per_sec": 10.0, "step_time": 0.5,
     "system/hostA/cpu_percent": 50.0, "system/hostA/host_memory_percent": 20.0},
    {"step": 4, "loss": 0.5, "learning_rate": 0.05, "slices_per_sec": 12.0, "step_time": 0.25,
     "val_dice": 0.7, "val_dice_foreground": 0.6, "val_dice_class0": 0.8,
     "val_dice_class1": 0.6, "system/hostA/cpu_percent": 70.0},
]


def _manifest(**extra):
  return dict({"started": "2026-12-07T00:00:00+00:00", "model": {"name": "unet"},
               "training": {"devices": 8, "processes": 2, "steps": 10},
               "dataset": {"classes": ["background", "tumour"]},
               "command": {"argv": [sys.executable, "-m", "medseg_jax.main",
                                    "--config=configs/quickstart.py", "--workdir=w"],
                           "cwd": REPO, "processes": 1, "launcher": None}}, **extra)


def _run(directory, manifest, processes, records=RECORDS, tail=""):
  """A run directory as a training run leaves it: manifest, metrics.jsonl (with `tail`
  appended unfinished), its processes' records, a checkpoint and a montage."""
  os.makedirs(directory / "processes")
  (directory / "manifest.json").write_text(json.dumps(manifest))
  (directory / "config.json").write_text(json.dumps({"seed": 0}))
  (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
  for p in processes:
    (directory / "processes" / f"{p['process']}.json").write_text(json.dumps(p))
  os.makedirs(directory / "checkpoints" / "4" / "metrics")
  (directory / "checkpoints" / "4" / "metrics" / "metrics").write_text('{"dice": 0.7}')
  os.makedirs(directory / "checkpoints" / "4.orbax-checkpoint-tmp-1")  # not finalised
  os.makedirs(directory / "eval" / "montage")
  for step in (2, 4):
    (directory / "eval" / "montage" / f"val_step{step:07d}.png").write_bytes(b"png%d" % step)
  (directory / "train.log").write_text("".join(f"line {i}\n" for i in range(3000)))


def _alive(index, host="hostA"):
  return {"process": index, "host": host, "pid": 1, "heartbeat": time.time() + 3600,
          "heartbeat_seconds": 5, "end": None}


def _ended(index, reason, code, host="hostA"):
  return {"process": index, "host": host, "pid": 1, "heartbeat": 0, "heartbeat_seconds": 5,
          "end": {"reason": reason, "exit_code": code, "message": "why", "time": 0}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  base = tmp_path_factory.mktemp("dash")
  root = base / "runs"
  _run(root / "group" / "live", _manifest(),
       [_alive(0), _alive(1, "hostB")], tail='{"step": 6, "loss": 0.')
  _run(root / "done", _manifest(final_metrics={"test": {"dice": 0.75}}),
       [_ended(0, "finished", 0)])
  _run(root / "halted", _manifest(), [_ended(0, "stopped", 0)])
  os.makedirs(root / "old")
  (root / "old" / "manifest.json").write_text(json.dumps({"final_metrics": {"test": {"dice": 0.5}}}))
  (base / "secret.txt").write_text("not for the dashboard")
  return root


def test_runs_are_found_below_the_directory_and_not_inside_a_runs_outputs(root):
  assert runs.find(str(root)) == ["done", "group/live", "halted", "old"]


def test_a_rows_values_come_from_the_runs_files(root):
  def row_of(name):
    return runs.summary(name, runs.read(str(root / name)),
                        runs.Records(str(root / name / "metrics.jsonl")).refresh())
  row = row_of("group/live")
  assert (row["status"], row["config"], row["network"]) == ("running", "quickstart.py", "unet")
  assert (row["devices"], row["hosts"], row["step"], row["total_steps"]) == (8, 2, 4, 10)
  assert row["eta_seconds"] == pytest.approx((10 - 4) * 0.25)  # the newest step time
  assert (row["loss"], row["best_val_dice"], row["test_dice"]) == (0.5, 0.7, None)
  done = row_of("done")
  assert (done["status"], done["test_dice"], done["eta_seconds"]) == ("finished", 0.75, None)
  assert runs.summary("old", runs.read(str(root / "old")), [])["status"] == "finished"  # from its test metrics


def test_records_are_read_whole_lines_only_and_again_after_a_resume_shrinks_them(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"step": 4, "lo')
  reader = runs.Records(str(path))
  assert [r["step"] for r in reader.refresh()] == [2]
  with open(path, "a") as f:
    f.write('ss": 0.5}\n')
  assert [r["step"] for r in reader.refresh()] == [2, 4]
  path.write_text(json.dumps({"step": 3, "loss": 2.0}) + "\n")  # truncated, then appended
  assert [r["step"] for r in reader.refresh()] == [3]
  with open(path, "a") as f:
    f.write('{"step": 5, "loss": NaN, "grad_norm": Infinity}\n')  # a diverged step
  assert reader.refresh()[-1] == {"step": 5, "loss": None, "grad_norm": None}


def test_curves_smooth_the_loss_and_name_classes_and_hosts():
  out = curves.all_curves(RECORDS, ["background", "tumour"])
  assert out["loss"]["loss"] == [[2, 1.0], [4, 0.5]]
  # No EMAs recorded: computed over the logged means, by hand: 0.9 * 1.0 + 0.1 * 0.5.
  assert out["loss"]["ema 0.9"] == [[2, 1.0], [4, pytest.approx(0.95)]]
  assert out["validation"] == {"dice": [[4, 0.7]], "foreground dice": [[4, 0.6]],
                               "background": [[4, 0.8]], "tumour": [[4, 0.6]]}
  assert out["system"] == {"hostA": {"cpu_percent": [[2, 50.0], [4, 70.0]],
                                     "host_memory_percent": [[2, 20.0]]}}
  recorded = [dict(r, **{"loss_ema_0.9": 7.0, "loss_ema_0.99": 8.0, "loss_ema_0.999": 9.0})
              for r in RECORDS]
  assert curves.loss(recorded)["ema 0.99"] == [[2, 8.0], [4, 8.0]]  # as the run recorded


def test_checkpoints_montage_log_and_resume_command(root):
  live = str(root / "group" / "live")
  assert runs.checkpoints(live) == [{"step": 4, "metrics": {"dice": 0.7}}]
  assert runs.newest_montage(live) == os.path.join("eval", "montage", "val_step0000004.png")
  tail = runs.log_tail(live)
  assert tail.endswith("line 2999\n") and tail.startswith("line ") and len(tail) <= runs.LOG_TAIL_BYTES
  command = runs.resume_command(_manifest())
  assert command["argv"][1:3] == ["-m", "medseg_jax.main"] and command["cwd"] == REPO
  launched = runs.resume_command(_manifest(command={
      "argv": ["python3", "-m", "medseg_jax.main", "--process_id=0"], "cwd": "/x", "processes": 2,
      "launcher": {"command": "launch/local.sh 2 --config=configs/quick\\ start.py ", "cwd": "/r"}}))
  assert launched["argv"] == ["launch/local.sh", "2", "--config=configs/quick start.py"]
  assert launched["shell"] == "cd /r && launch/local.sh 2 '--config=configs/quick start.py'"


def _serve(root, *args):
  """A dashboard server process over `root`; returns it and its URL."""
  proc = subprocess.Popen([sys.executable, "-m", "medseg_jax.dashboard", str(root), *args],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  match = re.search(r"(http://\S+)", line)
  if not match:
    proc.kill()
    pytest.fail(line + proc.stderr.read())
  return proc, match.group(1)


@pytest.fixture(scope="module")
def server(root):
  proc, url = _serve(root)
  yield url.rstrip("/")
  proc.terminate()
  proc.wait(10)


def _call(url, method="GET", headers=None):
  """(status, body as text, headers) of one request."""
  request = urllib.request.Request(url, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.status, response.read().decode(errors="replace"), response.headers
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode(errors="replace"), e.headers


def _csrf(server):
  return re.search(r'name="csrf" content="([^"]+)"', _call(server + "/")[1]).group(1)


def test_every_page_and_read_endpoint_answers(server):
  for page in ("/", "/run/group/live", "/compare?runs=done,halted"):
    status, body, _ = _call(server + page)
    assert status == 200 and "/static/dashboard.js" in body
  for asset in ("dashboard.js", "chart.js", "style.css"):
    assert _call(f"{server}/static/{asset}")[0] == 200
  status, body, _ = _call(server + "/api/runs")
  assert status == 200
  assert {r["name"]: r["status"] for r in json.loads(body)} == {
      "done": "finished", "group/live": "running", "halted": "stopped", "old": "finished"}
  detail = json.loads(_call(server + "/api/run/group/live")[1])
  assert detail["montage"] == "/files/group/live/eval/montage/val_step0000004.png"
  assert detail["checkpoints"] == [{"step": 4, "metrics": {"dice": 0.7}}]
  assert [p["host"] for p in detail["processes"]] == ["hostA", "hostB"]
  assert _call(server + detail["montage"])[1] == "png4"
  assert json.loads(_call(server + "/api/curves/group/live")[1])["loss"]["loss"] == [[2, 1.0], [4, 0.5]]


def test_what_lies_outside_the_runs_or_is_no_run_is_refused(server):
  assert _call(server + "/files/%2e%2e/secret.txt")[0] == 403
  assert _call(server + "/files/done/..%2f..%2fsecret.txt")[0] == 403
  assert _call(server + "/files/done/nothing.png")[0] == 404
  assert _call(server + "/api/run/%2e%2e")[0] == 404
  assert _call(server + "/api/run/group")[0] == 404  # a directory, not a run
  assert _call(server + "/api/curves/nowhere")[0] == 404


def test_actions_are_posts_with_the_pages_csrf_token_from_this_site(server, root):
  csrf = _csrf(server)
  assert _call(server + "/api/stop/group/live")[0] == 405  # GET
  assert _call(server + "/api/stop/group/live", "POST")[0] == 403  # no CSRF token
  assert _call(server + "/api/stop/group/live", "POST", {"X-Medseg-Csrf": "guess"})[0] == 403
  status, body, _ = _call(server + "/api/stop/group/live", "POST",
                          {"X-Medseg-Csrf": csrf, "Origin": "http://evil.example"})
  assert status == 403 and "another site" in body
  assert not (root / "group" / "live" / "stop_request").exists()
  status, body, _ = _call(server + "/api/stop/done", "POST", {"X-Medseg-Csrf": csrf})
  assert status == 409 and "finished, not running" in body
  status, body, _ = _call(server + "/api/resume/group/live", "POST", {"X-Medseg-Csrf": csrf})
  assert status == 409 and "running" in body
  status, _, _ = _call(server + "/api/stop/group/live", "POST", {"X-Medseg-Csrf": csrf})
  assert status == 200
  request = json.loads((root / "group" / "live" / "stop_request").read_text())
  assert abs(request["time"] - time.time()) < 30


def test_a_token_guards_every_request_and_any_address_but_loopback_gets_one(root):
  proc, url = _serve(root, "--host=0.0.0.0")
  try:
    token = re.search(r"\?token=(\S+)", url).group(1)
    base = url.split("?")[0].replace("0.0.0.0", "127.0.0.1").rstrip("/")
    assert _call(base + "/api/runs")[0] == 401
    assert _call(base + "/api/runs", headers={"Authorization": f"Bearer {token}"})[0] == 200
    status, _, headers = _call(f"{base}/?token={token}")
    cookie = headers["set-cookie"].split(";")[0]
    assert status == 200 and "HttpOnly" in headers["set-cookie"]
    assert _call(base + "/api/runs", headers={"Cookie": cookie})[0] == 200
  finally:
    proc.terminate()
    proc.wait(10)


def test_a_missing_directory_or_a_taken_port_is_one_line(tmp_path, server):
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.dashboard", str(tmp_path / "none")],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'none'}: not a directory (the runs to show)"]
  port = server.rsplit(":", 1)[1]
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.dashboard", str(tmp_path),
                         f"--port={port}"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
  assert f"--port={port}: cannot bind" in proc.stderr


def test_resume_starts_only_a_stopped_run_of_this_machine_with_its_recorded_command(tmp_path):
  from medseg_jax.dashboard import actions  # pylint: disable=import-outside-toplevel
  remote = tmp_path / "remote"
  _run(remote, _manifest(), [_ended(0, "stopped", 0, host="gpu-node-7")])
  with pytest.raises(actions.Refused, match="other machines; run there: cd .* -m medseg_jax.main"):
    actions.resume(str(remote))
  by_hand = tmp_path / "by_hand"
  manifest = _manifest()
  manifest["command"]["processes"] = 2
  _run(by_hand, manifest, [_ended(0, "stopped", 0, host=os.uname().nodename)])
  with pytest.raises(actions.Refused, match="2 processes were started one by one"):
    actions.resume(str(by_hand))
  unrecorded = tmp_path / "unrecorded"
  _run(unrecorded, {"model": {"name": "unet"}}, [_ended(0, "stopped", 0)])
  with pytest.raises(actions.Refused, match="does not record the command"):
    actions.resume(str(unrecorded))
