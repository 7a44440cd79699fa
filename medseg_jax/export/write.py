"""--mode=export: one checkpoint of a run, with everything prediction needs, as one model
file (`medseg_jax.modelfile` lists its members).

The config is the one the checkpoint was saved with (its `meta`), so exporting needs no
config file; the arrays are read with orbax, as `--mode=evaluate` reads them.
"""

import copy
import dataclasses
import datetime
import json
import os
import tempfile
import time

import jax
import ml_collections
from absl import logging

from medseg_jax import config_schema, files, kinds, modelfile, models
from medseg_jax.data import targets
from medseg_jax.errors import MedsegError
from medseg_jax.evaluation import predict
from medseg_jax.export import card, onnx_graph
from medseg_jax.training import checkpoint, settings


# Settings of the exporting process itself, which it takes from --config: not a difference
# between the model file's config and the command line's.
EXPORT_OWN_KEYS = ("parallel.distributed_timeout_seconds", "parallel.gpu_preallocate",
                   "parallel.gpu_memory_fraction")
# How the model predicts (mirroring, post-processing, sliding windows), chosen after
# training (tuning.crossval decides mirroring and post-processing): an export with
# --config writes --config's values of these into the model file.
INFERENCE = "evaluation."


@dataclasses.dataclass(frozen=True)
class Run:
  """What an export reads from a run's workdir."""

  workdir: str
  which: str | int            # as --checkpoint named it
  step: int
  cfg: ml_collections.ConfigDict   # the checkpoint's own config
  kind: kinds.DataKind        # its kind of data, read from it once
  classes: list[str]          # the class names of its label map
  meta: dict                  # the checkpoint's meta item
  variables: dict             # {"params", "model_state"} as numpy arrays
  info: dict                  # WORKDIR/data_info.json
  manifest: dict              # WORKDIR/manifest.json ({} if absent)
  test: dict | None           # the test metrics of this step, if the run recorded them


def export_run(workdir: str, which: str, output: str, name: str | None = None,
               overwrite: bool = False,
               evaluation: ml_collections.ConfigDict | None = None) -> str | None:
  """Writes the model file of the checkpoint `which` ('latest', 'best' or a step) of the
  run in `workdir` to `output`, with the inference settings `evaluation` (the config's
  `evaluation` section) when given, else the checkpoint's. Every process reads the
  checkpoint; process 0 alone writes, atomically. Returns `output` (None on the other
  processes)."""
  if os.path.exists(output) and not overwrite:
    raise MedsegError(f"{output}: exists (pass --overwrite to replace it)")
  checkpoint.require_checkpoint(workdir)
  started = time.perf_counter()
  run = read_run(workdir, checkpoint.parse_which(which, "--checkpoint"))
  if evaluation is not None:
    cfg = copy.deepcopy(run.cfg)
    with cfg.unlocked():
      cfg.evaluation = copy.deepcopy(evaluation)
    run = dataclasses.replace(run, cfg=cfg)
  if jax.process_index() != 0:
    return None
  members = build_members(run)
  modelfile.write(output, members, summary(run, name))
  logging.info("Exported step %d of %s to %s (%.1f MiB) in %.1f s", run.step, workdir, output,
               os.path.getsize(output) / 2**20, time.perf_counter() - started)
  return output


def export_ensemble(workdirs: list[str], which: str, output: str, name: str | None = None,
                    overwrite: bool = False,
                    evaluation: ml_collections.ConfigDict | None = None) -> str | None:
  """Writes one ensemble file of the checkpoint `which` of every run in `workdirs` (the
  folds of a cross-validation, or a 2D and a 3D run): each exported as a single model,
  then bundled (`modelfile.write_ensemble`). Process 0 alone writes, atomically."""
  if os.path.exists(output) and not overwrite:
    raise MedsegError(f"{output}: exists (pass --overwrite to replace it)")
  with tempfile.TemporaryDirectory(prefix=".ensemble-",
                                   dir=os.path.dirname(os.path.abspath(output))) as tmp:
    paths = [export_run(w, which, os.path.join(tmp, f"{k}.zip"), overwrite=True,
                        evaluation=evaluation) for k, w in enumerate(workdirs)]
    if jax.process_index() != 0:
      return None
    bundle(paths, output, name, workdirs)
  return output


def bundle(paths: list[str], output: str, name: str | None = None,
           sources: list[str] | None = None) -> None:
  """Writes the single model files `paths` as one ensemble file at `output` (named
  `sources`, e.g. their runs, in errors), with its summary and card."""
  members = [modelfile.read_index(p)["summary"] for p in paths]
  mismatch = modelfile.ensemble_mismatch(list(zip(sources or paths, members)))
  if mismatch:
    raise MedsegError(mismatch)
  dice = [m.get("test_dice") for m in members]
  whole = {**members[0], "name": name or os.path.splitext(os.path.basename(output))[0],
           "members": len(members), "test_dice": None if None in dice else sum(dice) / len(dice),
           "exported": members[0]["exported"]}
  modelfile.write_ensemble(output, paths, whole, card.ensemble_card(whole, members))
  logging.info("Wrote an ensemble of %d models to %s (%.1f MiB)", len(paths), output,
               os.path.getsize(output) / 2**20)


def warn_if_config_differs(cfg: ml_collections.ConfigDict, workdir: str, which: str) -> None:
  """One warning naming the first keys in which `cfg` differs from the config of the
  checkpoint `which`: the model file carries the checkpoint's."""
  reader = checkpoint.Checkpointer(workdir)
  try:
    meta = reader.read_meta(reader.step(checkpoint.parse_which(which, "--checkpoint")))
  finally:
    reader.close()
  if not meta or "config" not in meta:
    return  # the export says so
  saved = config_schema.config_from_saved(meta["config"], reader.directory)
  changed = config_schema.differences(saved, cfg, ignore=EXPORT_OWN_KEYS)
  taken = {k: v for k, v in changed.items() if k.startswith(INFERENCE)}
  if taken:
    logging.info("The model file predicts with --config's %s", ", ".join(
        f"{k} {now!r} (trained with {was!r})" for k, (was, now) in taken.items()))
  changed = {k: v for k, v in changed.items() if not k.startswith(INFERENCE)}
  if changed:
    shown = [f"{k} {was!r} -> {now!r}" for k, (was, now) in list(changed.items())[:5]]
    more = f" and {len(changed) - len(shown)} more" if len(changed) > len(shown) else ""
    count = f"{len(changed)} key{'s' if len(changed) > 1 else ''}"
    logging.warning("The model file uses the checkpoint's config, not --config, which differs "
                    "from it in %s: %s%s", count, ", ".join(shown), more)


def read_run(workdir: str, which: str | int) -> Run:
  """The checkpoint `which` of the run in `workdir`, with its config and the run's records."""
  reader = checkpoint.Checkpointer(workdir)
  try:
    step = reader.step(which)
    meta = reader.read_meta(step)
    directory = reader.directory
  finally:
    reader.close()
  step_dir = os.path.join(directory, str(step))
  tree = checkpoint.read_state_tree(step_dir)  # an unreadable checkpoint is named first
  if not meta or "config" not in meta:
    raise MedsegError(f"{step_dir}: the checkpoint holds no config (not saved by a "
                      "training run of medseg_jax)")
  variables = {"params": tree["params"], "model_state": tree.get("model_state") or {}}
  manifest = files.read_json(os.path.join(workdir, "manifest.json"), "the run's manifest",
                             missing_ok=True) or {}
  cfg = config_schema.config_from_saved(meta["config"], step_dir)
  info = predict.read_run_info(workdir)
  return Run(workdir=workdir, which=which, step=step, cfg=cfg, kind=kinds.from_config(cfg),
             classes=settings.source(cfg).class_names(info["labels"]), meta=meta,
             variables=variables, info=info, manifest=manifest,
             test=_test_metrics(workdir, step, manifest))


def _test_metrics(workdir: str, step: int, manifest: dict) -> dict | None:
  """The test metrics the run recorded for `step`: WORKDIR/eval/test_metrics.json (written
  by training's test and by --mode=evaluate), else the manifest's final metrics."""
  found = files.read_json(os.path.join(workdir, "eval", "test_metrics.json"),
                          "the run's test metrics", missing_ok=True)
  if found and found.get("step") == step:
    return found
  final = (manifest.get("final_metrics") or {}).get("test")
  return final if final and final.get("step") == step else None


def build_members(run: Run) -> dict[str, bytes]:
  """Every member of the model file but its index."""
  source = _network_source(run)
  graph, no_graph = _onnx_graph(run)
  model_info = model_json(run, source)
  if no_graph:
    model_info["no_onnx_graph"] = no_graph  # why, for --engine=onnxruntime to say
  metrics = metrics_json(run)
  members = {modelfile.CONFIG: _json_bytes(run.cfg.to_dict()),
             modelfile.MODEL: _json_bytes(model_info),
             modelfile.PARAMS: modelfile.params_bytes(run.variables["params"],
                                                      run.variables["model_state"]),
             modelfile.METRICS: _json_bytes(metrics)}
  if source is not None:
    members[modelfile.NETWORK_DIR + os.path.basename(source[0])] = source[1]
  if graph is not None:
    members[modelfile.ONNX] = graph
  members[modelfile.CARD] = card.render(summary(run, None), model_info, metrics,
                                        run.manifest, run.cfg, run.meta,
                                        no_graph=no_graph).encode()
  return members


def _json_bytes(obj) -> bytes:
  return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def model_json(run: Run, carried: tuple[str, bytes] | None) -> dict:
  """model.json: data_info.json's content, the classes, the preprocessing settings, the
  network (`carried`: its source file, when it is a user's) and the checkpoint."""
  cfg, info = run.cfg, run.info
  return dict(
      info,
      classes=run.classes,
      class_labels=list(range(targets.from_info(info).num_labels)),
      preprocessing=run.kind.model_preprocessing(info),
      network={"name": cfg.model.name, "class": cfg.model.name.rpartition(":")[2],
               "compute_dtype": cfg.model.compute_dtype, "kwargs": cfg.model.kwargs.to_dict(),
               "source": (modelfile.NETWORK_DIR + os.path.basename(carried[0])
                          if carried else None)},
      components=run.meta.get("components", {}),
      step=run.step,
      checkpoint={"requested": str(run.which), "step": run.step,
                  "directory": os.path.join(checkpoint.directory(run.workdir), str(run.step))})


def metrics_json(run: Run) -> dict:
  """metrics.json: the test metrics of the exported step (or why there are none) and the
  run's manifest without its config (config.json has it)."""
  out = {"step": run.step, "test": run.test,
         "manifest": {k: v for k, v in run.manifest.items() if k != "config"}}
  if run.test is None:
    out["test_note"] = (f"the run recorded no test metrics for step {run.step}; "
                        f"--mode=evaluate --checkpoint={run.step} on the run measures them")
  return out


def summary(run: Run, name: str | None) -> dict:
  """The index's summary, which `python -m medseg_jax.zoo list` shows."""
  info, cfg = run.info, run.cfg
  test_dice = run.test.get("dice_foreground") if run.test else None
  return {**run.kind.zoo_fields(),
          "name": name or os.path.basename(os.path.abspath(run.workdir)),
          "task": _task(info), "classes": run.classes,
          "labels": list(range(targets.from_info(info).num_labels)), "modalities": list(info["modalities"]),
          "image_size": cfg.data.image_size, "channels": info["channels"],
          "test_dice": test_dice, "step": run.step, "network": cfg.model.name,
          "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds")}


def _task(info: dict) -> str:
  """dataset.json's name and description, where the dataset is still there."""
  found = files.read_json(os.path.join(info.get("root", ""), "dataset.json"),
                          "the dataset's description", missing_ok=True) or {}
  name = found.get("name") or info.get("dataset", "")
  return f"{name}: {found['description']}" if found.get("description") else name


def _network_source(run: Run) -> tuple[str, bytes] | None:
  """(path, content) of the network's source file when it is a user's component."""
  record = run.meta.get("components", {}).get("model.name") or {}
  path = record.get("source")
  if not path:
    return None
  if not os.path.isfile(path):
    raise MedsegError(f"{path}: the source of model.name={record.get('spec')!r} is gone; "
                      "the model file carries the network's source file")
  with open(path, "rb") as f:
    source = f.read()
  if record.get("sha256") and modelfile.sha256(source) != record["sha256"]:
    logging.warning("%s has changed since the checkpoint was saved (its SHA-256 differs); "
                    "the model file carries it as it is now", path)
  return path, source


def _onnx_graph(run: Run) -> tuple[bytes | None, str | None]:
  """The forward pass as ONNX (float32 compute, softmax probabilities or the regions'
  sigmoid ones, any batch), or why there is none, with one warning: the ONNX extra is not
  installed or the network does not convert (the file still predicts with --engine=jax)."""
  if not onnx_graph.available():
    reason = f"the ONNX extra was not installed at export ({onnx_graph.EXTRA_INSTALL})"
    logging.warning("No ONNX graph in the model file: %s; --engine=onnxruntime will not "
                    "run it", reason)
    return None, reason
  cfg, info = run.cfg, run.info
  model = models.build_model(cfg.model, info["num_classes"], cfg.data.image_size)
  model = model.clone(dtype=models.DTYPES["float32"])
  variables = {"params": run.variables["params"], **run.variables["model_state"]}
  outputs = targets.from_info(info)

  def probabilities(images):
    return outputs.probabilities(model.apply(variables, images, train=False))
  started = time.perf_counter()
  try:
    graph = onnx_graph.forward_graph(probabilities,
                                     run.kind.input_shape(info["channels"]))
  except MedsegError as e:
    reason = f"the network did not convert to ONNX: {e}"
    logging.warning("No ONNX graph in the model file (--engine=onnxruntime will not run "
                    "it): %s", reason)
    return None, reason
  logging.info("ONNX graph of the forward pass: %.1f s", time.perf_counter() - started)
  return graph, None
