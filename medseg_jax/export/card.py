"""MODEL.md, the model card of an exported model: what it segments, from which data, how
well, how it was trained, what it is for and how to predict with it."""

import ml_collections

_METRICS = (("dice_foreground", "Dice, mean over the foreground classes"),
            ("dice", "Dice, mean over all classes"),
            ("mean_iou_foreground", "IoU, mean over the foreground classes"),
            ("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean class accuracy"))


def render(summary: dict, model: dict, metrics: dict, manifest: dict,
           cfg: ml_collections.ConfigDict, meta: dict, no_graph: str | None) -> str:
  """The card, from the index's summary, model.json, metrics.json, the run's manifest, the
  checkpoint's config and meta, and whether the file carries an ONNX graph."""
  sections = [f"# {summary['name']}", "", _overview(summary, model), "",
              "## Data", "", *_data(model, manifest, cfg), "",
              "## Metrics", "", *_metrics(metrics, model["classes"], _is_3d(model)), "",
              "## Training", "", *_training(manifest, cfg, meta), "",
              "## Intended use and limits", "", *_limits(summary, model), "",
              "## How to predict", "", *_how_to(summary, no_graph), ""]
  return "\n".join(sections)


def _is_3d(model: dict) -> bool:
  return model["preprocessing"].get("spatial_dims") == 3


def _patch(pre: dict) -> str:
  return "x".join(str(n) for n in pre["patch_size"])


def _overview(summary: dict, model: dict) -> str:
  pre = model["preprocessing"]
  classes = ", ".join(f"{label} = {name}" for label, name in
                      zip(summary["labels"], summary["classes"]))
  if _is_3d(model):
    return (f"Task: {summary['task']}. A 3D network (`{summary['network']}`) that labels "
            f"every voxel of a NIfTI volume with one of {len(summary['classes'])} classes "
            f"({classes}), by sliding windows of {_patch(pre)} voxels at "
            f"{pre['target_spacing']} mm over {summary['channels']} input channel(s). "
            f"Exported from step {summary['step']} of its run.")
  return (f"Task: {summary['task']}. A 2D network (`{summary['network']}`) that labels every "
          f"voxel of a NIfTI volume with one of {len(summary['classes'])} classes "
          f"({classes}), slice by slice along axis {pre['slice_axis']}, from "
          f"{summary['channels']} input channel(s) resized to {summary['image_size']}x"
          f"{summary['image_size']}. Exported from step {summary['step']} of its run.")


def _data(model: dict, manifest: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  pre = model["preprocessing"]
  data = manifest.get("dataset", {})
  used = list(pre["modalities"]) or list(model["modalities"])
  if _is_3d(model):
    counts = ""
    preprocessing = (f"per channel {pre['channel_normalisation']} (ct: clipped to the "
                     f"{list(pre['ct_clip_percentiles'])} percentiles of the training "
                     f"foreground, then z-scored), resampled to {pre['target_spacing']} mm; "
                     f"training patches of {_patch(pre)} voxels")
  else:
    counts = f"; slices: {_splits(model.get('slices'))}"
    preprocessing = (f"{data.get('normalisation', pre['normalisation'])}; slices "
                     f"{pre['resize']} to {pre['image_size']}x{pre['image_size']}; training "
                     f"slices {pre['slice_selection']}")
  return [
      f"- Dataset: {model.get('dataset', '?')}" + (" (synthetic phantoms)"
                                                   if cfg.data.synthetic else ""),
      f"- Input volumes: 3D, or 4D with the modalities {list(model['modalities'])} in this "
      f"order; the model reads {used}",
      f"- Volumes per split (train/val/test): {_splits(model.get('volumes'))}{counts}",
      f"- Split: by volume, validation {cfg.data.val_fraction}, test "
      f"{cfg.data.test_fraction}, seed {cfg.seed}"
      + (f", fold {cfg.data.fold} of {cfg.data.num_folds}" if cfg.data.fold is not None else ""),
      f"- Preprocessing: {preprocessing}",
      f"- Labels: data.label_map {list(pre['label_map']) or 'none (labels as in the dataset)'}"
      f" over the dataset's labels {list(model.get('labels', []))}",
  ]


def _splits(counts: dict | None) -> str:
  if not counts:
    return "?"
  return "/".join(str(counts.get(s, "?")) for s in ("train", "val", "test"))


def _metrics(metrics: dict, classes: list[str], volumes: bool = False) -> list[str]:
  test = metrics.get("test")
  if not test:
    return [f"No test metrics: {metrics.get('test_note', 'none recorded')}."]
  unit = "volumes" if volumes else "slices"
  lines = [f"On the test split ({test.get('num_examples', '?')} {unit}), step {test['step']}:",
           ""]
  lines += [f"- {label}: {_number(test.get(key))}" for key, label in _METRICS if key in test]
  per_class = test.get("per_class")
  if per_class:
    lines += ["", "| class | Dice | IoU | support (pixels) |", "|---|---|---|---|"]
    lines += [f"| {classes[row['class']] if row['class'] < len(classes) else row['class']} | "
              f"{_number(row.get('dice'))} | {_number(row.get('iou'))} | {row.get('support')} |"
              for row in per_class]
  return lines


def _number(value) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def _training(manifest: dict, cfg: ml_collections.ConfigDict, meta: dict) -> list[str]:
  run = manifest.get("training", {})
  lr = manifest.get("lr_policy", {})
  optimizer = run.get("optimizer") or cfg.optim.to_dict()
  hardware = manifest.get("hardware", {})
  software = manifest.get("software", {}).get("packages", {})
  lines = [
      f"- Devices: {run.get('devices', meta.get('num_devices'))} "
      f"({', '.join(hardware.get('device_kinds', [])) or '?'}) in "
      f"{run.get('processes', meta.get('process_count', '?'))} process(es), strategy "
      f"{cfg.parallel.strategy}",
      f"- Global batch: {run.get('global_batch', meta.get('global_batch'))} "
      f"({cfg.train.per_device_batch_size} per device)",
      f"- Optimizer: {optimizer.get('name')}, base LR {optimizer.get('lr')}, momentum "
      f"{optimizer.get('momentum')}, weight decay {optimizer.get('weight_decay')}",
      f"- LR policy: {lr.get('policy', cfg.lr.policy)}, scaling {cfg.lr.scaling}, warmup "
      f"{cfg.lr.warmup}, decay {cfg.lr.decay}" +
      (f", peak LR {lr['peak_lr']:.4g}" if lr.get("peak_lr") is not None else ""),
      f"- Steps: {meta.get('step')} of {run.get('steps', '?')} planned"
      + (f" ({run['epochs']:.1f} epochs)" if run.get("epochs") is not None else "")
      + f"; loss {cfg.train.loss}; seed {cfg.seed}",
      f"- Augmentation: {'on' if cfg.data.augment.enabled else 'off'}; compute dtype "
      f"{cfg.model.compute_dtype}",
  ]
  if software:
    lines.append(f"- Software: jax {software.get('jax')}, flax {software.get('flax')}, "
                 f"optax {software.get('optax')}")
  if manifest.get("wall_time_seconds") is not None:
    lines.append(f"- Wall time: {manifest['wall_time_seconds'] / 60:.1f} min")
  return lines


def _limits(summary: dict, model: dict) -> list[str]:
  if _is_3d(model):
    pre = model["preprocessing"]
    sees = [f"- It sees {_patch(pre)} voxels at a time: context beyond a window is not used.",
            f"- Inputs are resampled to {pre['target_spacing']} mm; fine structures below "
            "that resolution are lost."]
  else:
    sees = ["- It sees one 2D slice at a time: context across slices is not used.",
            f"- Inputs are resized to {summary['image_size']}x{summary['image_size']}; fine "
            "structures below that resolution are lost."]
  return [
      "- For research on images like its training data: the same modalities in the same "
      f"order ({list(model['modalities'])}), a similar acquisition and resolution. It is "
      "not a medical device and was not validated for clinical use.",
      *sees,
      "- Its metrics hold for its test split only; measure it on your own data first.",
  ]


def _how_to(summary: dict, no_graph: str | None) -> list[str]:
  lines = ["```bash",
           "python3 -m medseg_jax.main --mode=predict --model=MODEL_FILE \\",
           "    --input=VOLUME.nii.gz|DIRECTORY --output=OUT.nii.gz|DIRECTORY "
           "[--probabilities]",
           "python3 -m medseg_jax.zoo install MODEL_FILE    # then --model=" + summary["name"],
           "```", "",
           "The output is a uint8 label map in the input's space (shape, affine, header)."]
  if not no_graph:
    lines.append("On a CPU without JAX's speed, `--engine=onnxruntime` runs the file's ONNX "
                 "graph (`model.onnx`: input images [batch, size, size, channels] "
                 "preprocessed as above, output softmax probabilities).")
  else:
    lines.append(f"This file carries no ONNX graph ({no_graph}): only `--engine=jax` "
                 "runs it.")
  return lines


def ensemble_card(summary: dict, members: list[dict]) -> str:
  """MODEL.md of an ensemble file: what it is, its members and how to use it (each
  member's own card is inside the member)."""
  rows = [f"| {k} | {m['name']} | {m['network']} | {m['step']} | {_number(m.get('test_dice'))} |"
          for k, m in enumerate(members)]
  return "\n".join([
      f"# {summary['name']}", "",
      f"An ensemble of {len(members)} models ({summary['task']}): each predicts the class "
      "probabilities of a volume in the volume's own grid, and the ensemble writes their "
      f"mean and its argmax. Classes: {', '.join(summary['classes'])}; modalities: "
      f"{', '.join(summary['modalities'])}.", "",
      "| member | name | network | step | test Dice (foreground) |", "|---|---|---|---|---|",
      *rows, "",
      f"Mean of the members' test Dice: {_number(summary.get('test_dice'))} (the ensemble's own "
      "is measured by predicting the test split with it). Each member's card is in "
      "`members/K.zip`.", "",
      "## How to use", "", "```bash",
      "python3 -m medseg_jax.main --mode=predict --model=MODEL_FILE --input=VOLUME.nii.gz "
      "--output=OUT.nii.gz",
      "python3 -m medseg_jax.zoo install MODEL_FILE    # then --model=" + summary["name"],
      "```", ""])
