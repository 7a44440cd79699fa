"""The process pool that reads and preprocesses subjects in parallel."""

import multiprocessing
import os
from typing import Callable, Iterator


def pool_map(fn: Callable, items: list, processes: int) -> Iterator:
  """`fn` over `items` in order, on `processes` worker processes (here when 1).

  Workers are spawned, not forked: the parent may already run JAX's threads."""
  if processes <= 1 or len(items) <= 1:
    yield from map(fn, items)
    return
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(min(processes, len(items))) as pool:
    yield from pool.imap(fn, items)


def worker_count(requested: int) -> int:
  """`data.preprocess_workers`, 0 meaning every CPU core this process may use."""
  return requested or len(os.sched_getaffinity(0))
