"""A run's curves for the run page, from its metrics.jsonl records.

Each curve is a list of [step, value] points. The loss comes raw (the mean of each
logged window) and smoothed with the EMA coefficients of `monitor.scalars.EMA_DECAYS` as
the run recorded them at each logged step (per training step, as in TensorBoard); for
a run that did not record them they are computed over the logged means instead.
"""

from medseg_jax.monitor.scalars import EMA_DECAYS, THROUGHPUT_UNITS

_SYSTEM = "system/"


def _points(records: list[dict], key: str) -> list[list]:
  return [[r["step"], r[key]] for r in records
          if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def loss(records: list[dict]) -> dict[str, list[list]]:
  """{"loss": raw points, "ema 0.9": ..., ...}."""
  raw = _points(records, "loss")
  out = {"loss": raw}
  for decay in EMA_DECAYS:
    recorded = _points(records, f"loss_ema_{decay}")
    out[f"ema {decay}"] = recorded if len(recorded) == len(raw) else _ema(raw, decay)
  return out


def _ema(points: list[list], decay: float) -> list[list]:
  out, value = [], None
  for step, x in points:
    value = x if value is None else decay * value + (1 - decay) * x
    out.append([step, value])
  return out


def validation(records: list[dict], classes: list[str]) -> dict[str, list[list]]:
  """Mean Dice, foreground Dice and each class's Dice (named from `classes`)."""
  out = {"dice": _points(records, "val_dice"),
         "foreground dice": _points(records, "val_dice_foreground")}
  keys = sorted({k for r in records for k in r if k.startswith("val_dice_class")},
                key=lambda k: int(k[len("val_dice_class"):]))
  for key in keys:
    index = int(key[len("val_dice_class"):])
    out[classes[index] if index < len(classes) else f"class {index}"] = _points(records, key)
  return {k: v for k, v in out.items() if v}


def throughput(records: list[dict]) -> dict[str, list[list]]:
  out = {}
  for unit in THROUGHPUT_UNITS:
    if any(f"{unit}_per_sec" in r for r in records):
      out[f"{unit}/s"] = _points(records, f"{unit}_per_sec")
  return out


def system(records: list[dict]) -> dict[str, dict[str, list[list]]]:
  """{host: {quantity: points}} from the `system/<host>/<quantity>` samples."""
  out: dict[str, dict[str, list[list]]] = {}
  for key in sorted({k for r in records for k in r if k.startswith(_SYSTEM)}):
    host, _, quantity = key[len(_SYSTEM):].partition("/")
    out.setdefault(host, {})[quantity] = _points(records, key)
  return out


def all_curves(records: list[dict], classes: list[str]) -> dict:
  return {"loss": loss(records),
          "learning_rate": {"learning rate": _points(records, "learning_rate")},
          "validation": validation(records, classes),
          "throughput": throughput(records),
          "system": system(records)}
