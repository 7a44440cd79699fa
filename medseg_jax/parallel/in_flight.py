"""A bound on the multi-device programs dispatched and not yet finished, on XLA:CPU.

JAX dispatches a compiled step and returns before it runs, so a loop that reads no result
queues steps ahead of the devices. XLA's CPU client lets each device hold 32 queued
computations (`max_inflight_computations_per_device`, which JAX does not expose); a
program beyond that blocks the dispatching thread while some of its devices already
hold it. Where the program all-reduces, those devices wait in the collective's
rendezvous for the ones still queued behind the block, and XLA ends the process after
`xla_cpu_collective_call_terminate_timeout_seconds` ("Expected 8 threads to join the
rendezvous, but only 7 of them arrived on time"; exit 134, a stack dump). Measured on 8
simulated devices: 30 programs in flight ran 3000 steps, 50 hung at once, idle or not;
a loaded machine lets the queue grow where an idle one keeps up.

So on the CPU backend every call of a bounded step first waits for the call `LIMIT`
calls back. GPUs and TPUs queue on streams without holding host threads: their calls
pass straight through, as do one-device meshes (no rendezvous).
"""

import collections
from typing import Any, Callable

import jax

LIMIT = 8  # programs in flight per mesh: well under the client's 32, enough to run ahead


class Bound:
  """The calls of every step wrapped by `wrap` share one queue of at most LIMIT results."""

  def __init__(self, devices: list):
    self._queue = (collections.deque() if len(devices) > 1 and devices[0].platform == "cpu"
                   else None)

  def wrap(self, compiled: Callable) -> Callable:
    if self._queue is None:
      return compiled
    def bounded(*args, **kwargs) -> Any:
      if len(self._queue) >= LIMIT:
        _wait(self._queue.popleft())
      out = compiled(*args, **kwargs)
      self._queue.append(out)
      return out
    return bounded


def _wait(out: Any) -> None:
  """Until the program that returned `out` has finished: waits for those of its arrays
  that a later step has not consumed (the train step's metrics; its state is donated to
  the next step, and a donated buffer may live on under another leaf's handle)."""
  for x in jax.tree.leaves(out):
    if isinstance(x, jax.Array) and not x.is_deleted():
      try:
        x.block_until_ready()
      except jax.errors.JaxRuntimeError as e:
        # jaxlib's words for such a buffer; were they to change, every resumed or
        # fault-tolerance test that trains past LIMIT steps fails on this line.
        if "deleted or donated" not in str(e):
          raise
