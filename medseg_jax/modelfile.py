"""The model file: one zip archive that carries a trained model out of its workdir.

`--mode=export` writes it; `--mode=predict --model=FILE`, `model.init_from=FILE` and the
model zoo (`medseg_jax.zoo`) read it. A zip, so that any tool can list and unpack it, and
nothing in it needs pickle to load. Members:

  medseg_model.json  first: the format name and version, the SHA-256 of every other member,
                     and a summary (task, classes, modalities, input size, test Dice, date)
  config.json        the run's resolved config
  model.json         what prediction needs: classes and labels, modalities, channels,
                     preprocessing settings, the network spec, the checkpoint step
  params.msgpack     {"params", "model_state"} as Flax msgpack (numpy arrays, no pickle)
  metrics.json       the test metrics and the run manifest's summary
  MODEL.md           the model card
  network/FILE.py    the network's source, when the network is a user's component
  model.onnx         the forward pass as an ONNX graph, when the ONNX extra was installed

An ensemble file (format version 2, index `"kind": "ensemble"`: the folds of a
cross-validation, or a 2D and a 3D model) holds whole model files instead:

  medseg_model.json  the index, as above, with the summary of the ensemble
  ensemble.json      the members, in order, each with its own summary
  members/K.zip      member K, a complete model file with its own index and checksums
  MODEL.md           the ensemble's card

A single model is still written as version 1, which every medseg_jax reads.

Reading checks everything before anything is used: that the file is a whole zip, its
format and version, that every member the index lists is there with its SHA-256, and
that the members prediction needs are listed. Every problem is one MedsegError naming
the file.
"""

import dataclasses
import hashlib
import io
import json
import os
import zipfile

import numpy as np

from medseg_jax import files
from medseg_jax.errors import MedsegError, first_line

FORMAT = "medseg_jax model"
SINGLE, ENSEMBLE_VERSION = 1, 2  # the versions a single model and an ensemble are written as
VERSION = ENSEMBLE_VERSION       # the newest version read
INDEX = "medseg_model.json"
# What runs a file's network: its parameters (jax), its ONNX graph (onnxruntime), or auto:
# ONNX Runtime for one process on a CPU when the file has a graph, else JAX.
ENGINES = ("auto", "jax", "onnxruntime")
CONFIG, MODEL, PARAMS, METRICS, CARD, ONNX = (
    "config.json", "model.json", "params.msgpack", "metrics.json", "MODEL.md", "model.onnx")
NETWORK_DIR = "network/"
REQUIRED = (CONFIG, MODEL, PARAMS, METRICS, CARD)
ENSEMBLE, MEMBERS_DIR = "ensemble.json", "members/"
ENSEMBLE_REQUIRED = (ENSEMBLE, CARD)
# Arrays and graphs barely compress: stored as they are, so writing and reading stay fast.
_STORED = (PARAMS, ONNX)


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def params_bytes(params, model_state) -> bytes:
  """The network's variables as Flax msgpack."""
  tree = {"params": params, "model_state": model_state}
  serialization = _serialization()
  return serialization.msgpack_serialize(serialization.to_state_dict(_to_numpy(tree)))


def _serialization():
  """flax.serialization, imported when parameters are written or read: flax brings JAX
  along, and the zoo's commands, which read only a file's index and card, start without
  it."""
  import flax.serialization  # pylint: disable=import-outside-toplevel
  return flax.serialization


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def write(path: str, members: dict[str, bytes], summary: dict) -> None:
  """Writes the model file at `path` atomically (nothing is left behind on failure):
  the index with every member's SHA-256 and `summary` first, then `members`."""
  missing = [name for name in REQUIRED if name not in members]
  if missing:
    raise ValueError(f"a model file needs the members {missing}")
  _write_index_and_members(path, {"format": FORMAT, "version": SINGLE, "summary": summary},
                           members)


def write_ensemble(path: str, member_paths: list[str], summary: dict, card: str) -> None:
  """Writes the ensemble file at `path` atomically: each model file of `member_paths`
  (read and checked first) as a member, in order."""
  data = [_bytes_of(p) for p in member_paths]
  files_read = [_read_archive(p, zipfile.ZipFile(io.BytesIO(d)))
                for p, d in zip(member_paths, data)]
  if any(f.is_ensemble for f in files_read):
    raise MedsegError("an ensemble's members are single models, not ensembles")
  members = {f"{MEMBERS_DIR}{k}.zip": d for k, d in enumerate(data)}
  members[ENSEMBLE] = json.dumps({"members": [
      {"member": f"{MEMBERS_DIR}{k}.zip", "summary": f.summary}
      for k, f in enumerate(files_read)]}, indent=2, sort_keys=True).encode() + b"\n"
  members[CARD] = card.encode()
  _write_index_and_members(path, {"format": FORMAT, "version": ENSEMBLE_VERSION,
                                  "kind": "ensemble", "summary": summary}, members)


def ensemble_mismatch(models: list[tuple[str, dict]]) -> str | None:
  """Why models (name, their model.json or summary) cannot be averaged into one ensemble:
  the first whose modalities, classes or regions (`data.regions`: sigmoid outputs are not
  averaged with softmax ones) differ from the first model's; None if none do."""
  (first, known), *others = models
  for name, info in others:
    for key in ("modalities", "classes", "regions"):
      if list(info.get(key, [])) != list(known.get(key, [])):
        return (f"{name}: {key} {list(info.get(key, []))} differ from {first}'s "
                f"{list(known.get(key, []))}; an ensemble's models must share them")
  return None


def _bytes_of(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _write_index_and_members(path: str, head: dict, members: dict[str, bytes]) -> None:
  index = {**head, "members": {name: sha256(data) for name, data in sorted(members.items())}}
  with files.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
    archive.writestr(INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n",
                     zipfile.ZIP_DEFLATED)
    for name, data in sorted(members.items()):
      kind = (zipfile.ZIP_STORED if name in _STORED or name.startswith(MEMBERS_DIR)
              else zipfile.ZIP_DEFLATED)
      archive.writestr(name, data, kind)


@dataclasses.dataclass(frozen=True)
class ModelFile:
  """A model file read and checked: its index and every member's bytes."""

  path: str
  index: dict
  members: dict[str, bytes]

  @property
  def summary(self) -> dict:
    return self.index["summary"]

  @property
  def is_ensemble(self) -> bool:
    return self.index.get("kind") == "ensemble"

  def member_files(self) -> list["ModelFile"]:
    """The single models of an ensemble file (itself, for a single model), read and
    checked; each is named PATH:members/K.zip in errors."""
    if not self.is_ensemble:
      return [self]
    return [_read_archive(f"{self.path}:{m['member']}",
                          zipfile.ZipFile(io.BytesIO(self.members[m["member"]])))
            for m in self._listed_members()]

  def _listed_members(self) -> list[dict]:
    """ensemble.json's members: {"member": its zip member's name, "summary"}, in order."""
    return json.loads(self.members[ENSEMBLE])["members"]

  def json(self, name: str) -> dict:
    return json.loads(self.members[name])

  @property
  def onnx(self) -> bytes | None:
    return self.members.get(ONNX)

  def network_source(self) -> tuple[str, bytes] | None:
    """(file name, source) of the user's network the file carries, or None."""
    for name, data in self.members.items():
      if name.startswith(NETWORK_DIR):
        return name[len(NETWORK_DIR):], data
    return None

  def variables(self) -> dict:
    """{"params", "model_state"} as nested dicts of numpy arrays."""
    if self.is_ensemble:
      raise MedsegError(f"{self.path}: an ensemble of {len(self._listed_members())} models "
                        "has no single set of parameters; use one of its members")
    try:
      tree = _serialization().msgpack_restore(self.members[PARAMS])
    except Exception as e:  # pylint: disable=broad-except  (msgpack raises many kinds)
      raise MedsegError(f"{self.path}: {PARAMS} is not Flax msgpack ({first_line(e)})") from e
    if not isinstance(tree, dict) or set(tree) != {"params", "model_state"}:
      raise MedsegError(f"{self.path}: {PARAMS} does not hold params and model_state")
    return tree


def read_index(path: str) -> dict:
  """The checked index of the model file at `path` (members are not read)."""
  with _open(path) as archive:
    return _index(path, archive)


def read(path: str) -> ModelFile:
  """The model file at `path`, every member read and checked against its SHA-256."""
  with _open(path) as archive:
    return _read_archive(path, archive)


def _read_archive(path: str, archive: zipfile.ZipFile) -> ModelFile:
  with archive:
    index = _index(path, archive)
    members = {}
    for name, digest in index["members"].items():
      try:
        data = archive.read(name)
      except KeyError:
        raise MedsegError(f"{path}: member {name} is missing (an incomplete model "
                          "file)") from None
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise MedsegError(f"{path}: member {name} is unreadable ({first_line(e)}); the "
                          "file is damaged") from e
      if sha256(data) != digest:
        raise MedsegError(f"{path}: member {name} does not match its SHA-256 (the file is "
                          "damaged or was changed after export)")
      members[name] = data
  return ModelFile(path=path, index=index, members=members)


def _open(path: str) -> zipfile.ZipFile:
  if not os.path.isfile(path):
    raise MedsegError(f"{path}: no such model file")
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise MedsegError(f"{path}: not a medseg_jax model file, or a truncated one (not a "
                      f"whole zip archive: {first_line(e)})") from e


def is_model_file(path: str) -> bool:
  """Whether `path` is a zip archive (a model file, or meant to be one)."""
  return os.path.isfile(path) and zipfile.is_zipfile(path)


def _index(path: str, archive: zipfile.ZipFile) -> dict:
  """The index member, checked: format, version, and that it lists what prediction needs."""
  try:
    index = json.loads(archive.read(INDEX))
  except KeyError:
    raise MedsegError(f"{path}: not a medseg_jax model file (no {INDEX})") from None
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise MedsegError(f"{path}: unreadable {INDEX} ({first_line(e)}); the file is "
                      "damaged") from e
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise MedsegError(f"{path}: not a medseg_jax model file ({INDEX} names another format)")
  version = index.get("version")
  if not isinstance(version, int) or version > VERSION or version < 1:
    raise MedsegError(f"{path}: model file format version {version!r}; this medseg_jax "
                      f"reads versions 1 to {VERSION} (a newer medseg_jax wrote it?)")
  listed = index.get("members")
  required = ENSEMBLE_REQUIRED if index.get("kind") == "ensemble" else REQUIRED
  missing = [n for n in required if not isinstance(listed, dict) or n not in listed]
  if missing:
    raise MedsegError(f"{path}: member {missing[0]} is missing from the model file's index")
  return index
