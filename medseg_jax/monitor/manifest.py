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

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "nibabel",
            "ml-collections", "tensorstore", "tensorboardX", "absl-py")
def at_start(cfg, data_info: dict, class_names: list[str], parameters: int, lr, *,
             devices: int, global_batch: int, steps_per_epoch: int, num_steps: int,
             components: dict, data_record: dict, split_seed: int) -> dict:
  """The manifest's record of a run as it starts; `lr` is the resolved LR schedule
  (`optim.ResolvedSchedule`), `components` the record of every component by config key
  (spec, source file, SHA-256), `data_record` what the run's kind of data (slices or
  volumes) records of its settings, `split_seed` the seed that drew the split."""
  return {
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": cfg.to_dict(),
      "code": code_version(),
      "software": software(),
      "hardware": hardware(),
      "dataset": dict(dataset(cfg, data_info, class_names, split_seed), **data_record),
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
      "seeds": seed_record(cfg, split_seed),
      "runs": repeats([cfg.seed]),
      "command": command(),
      "end": None,  # how the run ended (monitor.run_state), once it has
  }


def command() -> dict:
  """How this run was started: the interpreter and its arguments (`-m MODULE` when run
  so), the working directory, the number of processes, and the launcher script that
  started them (its command line and directory, which `launch/*.sh` set), if any."""
  main = sys.modules.get("__main__")
  module = getattr(getattr(main, "__spec__", None), "name", None)
  argv = ([sys.executable, "-m", module, *sys.argv[1:]] if module
          else [sys.executable, *sys.argv])
  launcher = os.environ.get("MEDSEG_LAUNCHER")
  return {"argv": argv, "cwd": os.getcwd(), "processes": jax.process_count(),
          "launcher": ({"command": launcher.strip(),
                        "cwd": os.environ.get("MEDSEG_LAUNCHER_CWD")} if launcher else None)}


def seed_record(cfg, split_seed: int) -> dict:
  """The seeds of a run and what each draws: `data.split_seed` (unset: `seed`) the split
  and a synthetic dataset, `seed` the rest."""
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


def dataset(cfg, info: dict, class_names: list[str], split_seed: int) -> dict:
  """What every run records of its dataset, split and augmentation."""
  return {"name": info["dataset"], "root": os.path.abspath(info["root"]),
          "fingerprint": fingerprint(info["root"]),
          "modalities_available": list(info["modalities"]),
          "modalities_used": list(cfg.data.modalities) or list(info["modalities"]),
          "labels": list(info["labels"]), "label_map": list(cfg.data.label_map),
          "classes": class_names,
          "skipped_invalid": info.get("skipped", []), "volumes": info["volumes"],
          "split": {"val_fraction": cfg.data.val_fraction,
                    "test_fraction": cfg.data.test_fraction,
                    "seed": split_seed, "fold": cfg.data.fold,
                    "num_folds": cfg.data.num_folds if cfg.data.fold is not None else None},
          "augmentation": (cfg.data.augment.to_dict() if cfg.data.augment.enabled
                           else "none"),
          "synthetic": cfg.data.synthetic}


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
  current = files.read_json(path, "the run's manifest", missing_ok=True) or {}
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
