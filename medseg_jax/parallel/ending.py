"""How a process of a jax.distributed group ends without the runtime aborting it.

Every process holds a client of JAX's coordination service, which process 0 hosts. A
client that loses the service while connected aborts its process (jaxlib's agent polls
the service for errors; the failed poll calls the client's missed-heartbeat callback,
whose default is a fatal log, "Terminating process because the JAX distributed service
detected fatal errors", a C++ stack dump and SIGABRT; a Python callback cannot replace
it, jaxlib 0.10 fails converting its absl::Status with std::bad_cast). So the order in
which processes leave decides whether one aborts:

  * a process other than 0 disconnects its client first (`client.shutdown()`); once
    disconnected its agent no longer polls, and the service may go at any time;
  * process 0 stops the service last: after every other process that is still alive has
    disconnected (`get_live_nodes` returns once each one has, or has died), and then with
    `jax.distributed.shutdown()`, whose graceful gRPC shutdown still delivers the replies
    to disconnects in flight.

This needs the service started without a shutdown barrier (`SHUTDOWN_BARRIER_SECONDS`):
with one, a client's shutdown waits until every process shuts down, and a process that
leaves alone (its own error, or a lost peer) waits there until process 0 exits and then
aborts.
"""

import atexit
import contextlib
import os
import threading
from typing import Any, Callable, Iterator, NoReturn

import jax
from absl import logging
from jax.errors import JaxRuntimeError

# 0: a client's shutdown disconnects it alone (the service then imposes no barrier).
SHUTDOWN_BARRIER_SECONDS = 0
# Called with (line, exit code) as `end_process` begins: records of how the process ended.
_AT_END: list[Callable[[str, int], None]] = []


@contextlib.contextmanager
def recorded_end(record: Callable[[str, int], None]) -> Iterator[None]:
  """Inside this context, `end_process` calls `record(line, code)` before it ends the
  process."""
  _AT_END.append(record)
  try:
    yield
  finally:
    _AT_END.remove(record)


def end_process(client: Any, timeout: float, line: str, code: int,
                gone: tuple[int, ...] = ()) -> NoReturn:
  """Writes `line` to stderr as this process's last output and exits with `code`, in the
  order above; `client` is the group's client of the service. `gone` are processes known
  dead (silent): process 0 does not wait for them, and waits `timeout` seconds at most
  for the others. Not sys.exit: the main thread may be blocked in a collective with a
  lost process, and JAX's shutdown at exit would wait for it."""
  for record in _AT_END:
    try:
      record(line, code)
    except Exception:  # pylint: disable=broad-except  (the line below must still come)
      pass
  logging.flush()
  os.write(2, line.encode())
  _silence_stderr()
  if jax.process_index() == 0:
    wait_for_disconnects(client, timeout, gone)
    _shut_down(jax.distributed.shutdown)
  else:
    _shut_down(client.shutdown)
  os._exit(code)  # pylint: disable=protected-access


def wait_for_disconnects(client: Any, timeout: float, gone: tuple[int, ...] = ()) -> None:
  """Process 0: returns once every other process not in `gone` has disconnected from the
  service or died, or after `timeout` seconds (a process that has not left by then is
  stuck; the service's end may abort it)."""
  others = [p for p in range(jax.process_count()) if p != 0 and p not in gone]
  if not others:
    return
  done = threading.Event()

  def wait() -> None:
    # Blocks until each of these processes is disconnected, dead, or calls it too (which
    # no other process does).
    try:
      client.get_live_nodes([0, *others])
    except JaxRuntimeError:
      pass
    done.set()

  threading.Thread(target=wait, name="WaitForDisconnects", daemon=True).start()
  done.wait(timeout)


def last_out_at_exit(client: Any, timeout: float) -> None:
  """Makes process 0 wait at its exit until the others have disconnected, before JAX's
  own `clean_up` (registered when jax was imported, so run after this one) stops the
  service under them. The others disconnect in that `clean_up`."""
  if jax.process_index() == 0:
    atexit.register(wait_for_disconnects, client, timeout)


def _shut_down(shutdown) -> None:
  try:
    shutdown()
  except JaxRuntimeError:  # the service is gone already: nothing left to disconnect from
    pass


def _silence_stderr() -> None:
  """Nothing after the one line: threads that lose their calls into the runtime while the
  process ends (orbax's, the stop agreement's) would print their errors below it."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
