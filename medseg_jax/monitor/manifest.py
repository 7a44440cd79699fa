"""The reproducibility manifest: WORKDIR/manifest.json and a readable WORKDIR/MANIFEST.md.

Written when a run starts and completed when it ends, it records what the source
thesis asks every run to report: architecture and hyperparameters, optimizer and LR
policy, the dataset (dimensions, counts, preprocessing, augmentation, split ratios),
the infrastructure (hardware, software versions), seeds, number of runs, and at least
three segmentation metrics.
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import jax
import psutil

from medseg_jax import files
from medseg_jax.data import split

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "nibabel",
            "ml-collections", "tensorstore", "tensorboardX", "absl-py")
NORMALISATION = {"zscore_nonzero":
                 "z-score over the non-zero voxels of each volume and channel",
                 "percentile": "clipped to the {} percentiles of each volume and channel, "
                               "rescaled to [0, 1]"}


def at_start(cfg, data_info: dict, class_names: list[str], parameters: int, lr, *,
             devices: int, global_batch: int, steps_per_epoch: int, num_steps: int,
             components: dict) -> dict:
  """The manifest's record of a run as it starts; `lr` is the resolved LR schedule
  (`optim.ResolvedSchedule`), `components` the record of every component by config key
  (spec, source file, SHA-256)."""
  return {
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": cfg.to_dict(),
      "code": code_version(),
      "software": software(),
      "hardware": hardware(),
      "dataset": dataset(cfg, data_info, class_names),
      "model": {"name": cfg.model.name, "parameters": parameters,
                "compute_dtype": cfg.model.compute_dtype},
      "components": components,
      "training": {"strategy": cfg.parallel.strategy, "devices": devices,
                   "processes": jax.process_count(),
                   "per_device_batch": cfg.train.per_device_batch_size,
                   "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
                   "samples_per_epoch": data_info.get("samples_per_epoch"),
                   "steps": num_steps, "epochs": num_steps / steps_per_epoch,
                   "optimizer": dict(cfg.optim.to_dict()), "loss": cfg.train.loss},
      "lr_policy": {"policy": cfg.lr.policy, "scaling": cfg.lr.scaling, "k": lr.k,
                    "peak_lr": lr.peak_lr,
                    "phases": [{"name": p.name, "start_step": p.start, "end_step": p.end,
                                "start_epoch": p.start / steps_per_epoch,
                                "end_epoch": p.end / steps_per_epoch,
                                "lr_start": p.lr_start, "lr_end": p.lr_end}
                               for p in lr.phases]},
      "seeds": seed_record(cfg),
      "runs": repeats([cfg.seed]),
  }


def seed_record(cfg) -> dict:
  """The seeds of a run and what each draws: `data.split_seed` (unset: `seed`) the split
  and a synthetic dataset, `seed` the rest."""
  split_seed = split.split_seed(cfg)
  split_from = "data.split_seed" if cfg.data.split_seed is not None else "seed"
  return {"seed": cfg.seed, "split_seed": split_seed,
          "derived": f"split and synthetic data follow {split_from} ({split_seed}); batch "
                     "order, initialisation and dropout follow seed"}


def repeats(seeds: list[int], tool: str | None = None, group: str | None = None) -> dict:
  """The manifest's `runs`: how often the settings were trained, with which seeds, and by
  which tool (a run on its own: once, with its seed)."""
  out = {"count": len(seeds), "seeds": list(seeds)}
  if tool:
    out.update(tool=tool, group=group)
  return out


def record_repeats(workdir: str, seeds: list[int], tool: str, group: str) -> None:
  """Records in a finished run's manifest that `tool` trained its settings with `seeds`."""
  if os.path.exists(os.path.join(workdir, "manifest.json")):
    write(workdir, {"runs": repeats(seeds, tool, group)})


def at_end(workdir: str, wall_seconds: float, test: dict | None) -> dict:
  keys = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "dice_foreground",
          "mean_iou_foreground", "step", "num_examples")
  return {"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "wall_time_seconds": wall_seconds,
          "final_metrics": {"test": {k: test[k] for k in keys} if test else None}}


def code_version() -> dict:
  """Git commit and dirty flag of the code that runs, where git knows it."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  def git(*args):
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def software() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"python": sys.version.split()[0], "platform": platform.platform(),
          "packages": versions}


def hardware() -> dict:
  devices = jax.devices()
  accelerators = []
  for d in jax.local_devices():
    if d.platform != "cpu":
      stats = d.memory_stats() or {}
      accelerators.append({"kind": d.device_kind,
                           "memory_gib": stats.get("bytes_limit", 0) / 2**30 or None})
  return {"backend": devices[0].platform, "device_kinds": sorted({d.device_kind for d in devices}),
          "devices": len(devices), "local_devices": jax.local_device_count(),
          "processes": jax.process_count(), "host_cpu": _cpu_model(),
          "host_cpu_cores": os.cpu_count(),
          "host_memory_gib": psutil.virtual_memory().total / 2**30,
          "accelerators": accelerators}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def dataset(cfg, info: dict, class_names: list[str]) -> dict:
  common = {"name": info["dataset"], "root": os.path.abspath(info["root"]),
            "fingerprint": fingerprint(info["root"]),
            "modalities_available": list(info["modalities"]),
            "modalities_used": list(cfg.data.modalities) or list(info["modalities"]),
            "labels": list(info["labels"]), "label_map": list(cfg.data.label_map),
            "classes": class_names, "spatial_dims": cfg.data.spatial_dims,
            "skipped_invalid": info.get("skipped", []), "volumes": info["volumes"],
            "split": {"val_fraction": cfg.data.val_fraction,
                      "test_fraction": cfg.data.test_fraction,
                      "seed": split.split_seed(cfg)},
            "augmentation": (cfg.data.augment.to_dict() if cfg.data.augment.enabled
                             else "none"),
            "synthetic": cfg.data.synthetic}
  if cfg.data.spatial_dims == 3:
    return dict(common, **_volumes(cfg, info))
  return dict(common, image_size=cfg.data.image_size, slice_axis=cfg.data.slice_axis,
              slices_per_volume=cfg.data.slices_per_volume,
              slice_selection=cfg.data.slice_selection,
              empty_slice_fraction=cfg.data.empty_slice_fraction, resize=cfg.data.resize,
              slice_store=info.get("store"), slices=info["slices"],
              normalisation=NORMALISATION[cfg.data.normalisation].format(
                  list(cfg.data.clip_percentiles)))


def _volumes(cfg, info: dict) -> dict:
  """The 3D record: spacing, normalisation, patches and their sampling, inference."""
  return {"volume_store": info.get("store"),
          "target_spacing": info["target_spacing"],
          "target_spacing_source": ("data.target_spacing" if cfg.data.target_spacing
                                    else "median of the training images"),
          "normalisation": dict(zip(info["channel_names"], info["normalisation"])),
          "ct_statistics": info["ct_statistics"],
          "patch_size": list(cfg.data.patch_size),
          "sampling": {"foreground_fraction": cfg.data.foreground_fraction,
                       "foreground_samples": cfg.data.foreground_samples,
                       "patches_per_epoch": info.get("samples_per_epoch"),
                       "rule": "volume from the epoch's order, position from (seed, epoch, "
                               "index); the last ceil(fraction x global batch) draws of "
                               "each global batch centred on a foreground voxel"},
          "inference": {"window_overlap": cfg.evaluation.window_overlap,
                        "gaussian_sigma": cfg.evaluation.gaussian_sigma,
                        "mirror": cfg.evaluation.mirror}}


def fingerprint(root: str) -> str:
  """SHA-256 over dataset.json and the names and sizes of the files it lists."""
  digest = hashlib.sha256()
  with open(os.path.join(root, "dataset.json"), "rb") as f:
    digest.update(f.read())
  for dirpath, _, names in sorted(os.walk(root)):
    for name in sorted(names):
      if name.endswith((".nii", ".nii.gz")):
        path = os.path.join(dirpath, name)
        digest.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}".encode())
  return digest.hexdigest()


def write(workdir: str, update: dict) -> dict:
  """Merges `update` into manifest.json and rewrites MANIFEST.md from it."""
  path = os.path.join(workdir, "manifest.json")
  current = {}
  if os.path.exists(path):
    with open(path) as f:
      current = json.load(f)
  current.update(update)
  files.write_json(path, current)
  with files.atomic_path(os.path.join(workdir, "MANIFEST.md")) as tmp, open(tmp, "w") as f:
    f.write(render(current))
  return current


def render(m: dict) -> str:
  """The manifest as Markdown: one section per part, nested values as JSON."""
  lines = ["# Run manifest", ""]
  for key, value in m.items():
    lines.append(f"## {key.replace('_', ' ')}")
    lines.append("")
    if isinstance(value, dict):
      for k, v in value.items():
        shown = json.dumps(v) if isinstance(v, (dict, list)) else v
        lines.append(f"- **{k}**: {shown}")
    else:
      lines.append(str(value))
    lines.append("")
  return "\n".join(lines)
