"""Test-time mirroring: a network's class probabilities averaged over flips of its input,
each flipped back (nnU-Net's mirroring). 2D flips the rows and columns of each slice, 3D
every axis of each window: 4 and 8 passes of the network."""

import itertools
from typing import Callable, Sequence


def flips(mirror: bool, axes: Sequence[int]) -> list[tuple[int, ...]]:
  """The axes each pass flips along: none, or every combination of `axes`."""
  if not mirror:
    return [()]
  return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def mean_over_flips(probabilities: Callable, x, passes: Sequence[tuple[int, ...]],
                    flip: Callable):
  """The mean over `passes` of `probabilities` of `x` flipped along a pass's axes, flipped
  back; `flip` is np.flip or jnp.flip. One pass without flips is `probabilities(x)`."""
  total = None
  for axes in passes:
    out = probabilities(flip(x, axes) if axes else x)
    out = flip(out, axes) if axes else out
    total = out if total is None else total + out
  return total if len(passes) == 1 else total / len(passes)
