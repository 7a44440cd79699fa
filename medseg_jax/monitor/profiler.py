"""Traces chosen training steps with `jax.profiler`, for TensorBoard's profile tab or Perfetto.

`monitor.profile_steps` names consecutive steps, e.g. (10, 11, 12); () traces none. They
are traced in one session into WORKDIR/tensorboard/plugins/profile/<date_time>/:
`<host>.xplane.pb` for the profile tab of `tensorboard --logdir WORKDIR/tensorboard`
(with the `xprof` plugin installed) and `perfetto_trace.json.gz` for ui.perfetto.dev.
Each step is marked with `jax.profiler.StepTraceAnnotation("train", step_num=step)`.

Only process 0 traces: under synchronous data parallelism every process runs the same
program on equal shards, so one trace shows the step, and processes that share a host
would write files of the same name into one session directory.
"""

import contextlib
import os
from typing import Iterator, Sequence

import jax
from absl import logging

from medseg_jax.errors import ConfigError


def check_steps(steps: Sequence[int]) -> None:
  """Raises ConfigError unless `steps` is empty or consecutive steps counted from 1."""
  whole = isinstance(steps, (tuple, list)) and all(type(s) is int for s in steps)  # not bool
  if not whole or (steps and list(steps) != list(range(max(steps[0], 1), steps[-1] + 1))):
    raise ConfigError(f"monitor.profile_steps={steps!r}: must be consecutive steps counted "
                      "from 1, e.g. (10, 11); () traces none")


class Profiler:
  """A trace of `steps` (on process 0): call `step` around each train step, and use the
  profiler as a context so that a loop that ends inside them still ends the trace."""

  def __init__(self, workdir: str, steps: Sequence[int]):
    check_steps(steps)
    self._steps = tuple(steps) if jax.process_index() == 0 else ()
    self._dir = os.path.join(workdir, "tensorboard")
    self._tracing = False

  def step(self, step: int) -> contextlib.AbstractContextManager:
    """The context to run `step` in: traced and annotated if it is one of the steps."""
    return self._traced(step) if step in self._steps else contextlib.nullcontext()

  @contextlib.contextmanager
  def _traced(self, step: int) -> Iterator[None]:
    if not self._tracing:  # the first of the steps, or the first after a resume
      jax.profiler.start_trace(self._dir, create_perfetto_trace=True)
      self._tracing = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield
    if step == self._steps[-1]:
      self.close()

  def close(self) -> None:
    """Ends the trace, if one runs, once the work dispatched so far has run."""
    if not self._tracing:
      return
    self._tracing = False
    # The step's computations run asynchronously; its outputs are among the live arrays.
    jax.block_until_ready(jax.live_arrays())
    jax.profiler.stop_trace()
    logging.info("Traced steps %d-%d into %s/plugins/profile: TensorBoard's profile tab, "
                 "or perfetto_trace.json.gz at ui.perfetto.dev", self._steps[0],
                 self._steps[-1], self._dir)

  def __enter__(self) -> "Profiler":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
