"""Time from process start to 'ready to train', split into its parts.

    python benchmarks/engine_overhead.py     # --configs=configs/quickstart.py --repeats=3

For each config: one process writes the dataset and preprocesses its slices (a first run
does that once), then --repeats fresh processes each go from start to the end of their
first train step, the way a run that restarts does. Each phase calls medseg_jax's public
functions in the order `training.setup.build` does, with a timer around each:

  interpreter  process spawn -> first line of this file
  imports      jax, flax, optax, orbax and medseg_jax's training modules
  config       the config file and its overrides through ml_collections' config flag
  build        mesh (and the jax backend), LR schedule, model init + optimizer state,
               state placed on the mesh, the step functions wrapped (not compiled)
  data open    the Decathlon index and the memory-mapped preprocessed slices
  first step   the first batch, compile and run of the train step

Each config runs without and with a warm persistent compilation cache
(JAX_COMPILATION_CACHE_DIR, filled by one untimed process), as a restarted run sees it.

'config + build' is what the thesis's component engine did in its reported 139 ms
(config parsing, building and deploying the parallel training components).
"""

import functools
import time

T0 = time.time()
CPU0 = time.process_time()  # the interpreter's own start-up

import argparse  # noqa: E402  (after the start time)
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("interpreter", "imports", "config", "build", "data_open", "first_step")
THESIS_ENGINE_S = 0.139


def child(argv: list[str], workdir: str, prepare: bool) -> dict:
  """One process's timeline; `prepare` only writes and preprocesses the data."""
  spawn = float(os.environ.get("MEDSEG_SPAWN_TIME", T0))
  marks = {"interpreter": T0 - spawn, "cpu/interpreter": CPU0}
  sys.path.insert(0, REPO)
  now, cpu = time.perf_counter(), [time.process_time()]

  def mark(name, since):
    """Adds the wall and CPU time since the previous mark to phase `name`."""
    marks[name] = marks.get(name, 0.0) + time.perf_counter() - since
    marks[f"cpu/{name}"] = marks.get(f"cpu/{name}", 0.0) + time.process_time() - cpu[0]
    cpu[0] = time.process_time()
    return time.perf_counter()

  from absl import flags
  import jax
  from ml_collections import config_flags
  from medseg_jax import optim
  from medseg_jax.training import losses, settings, setup, step as step_lib
  from medseg_jax.data import loader
  from medseg_jax.parallel import multihost, strategies
  now = mark("imports", now)

  holder = config_flags.DEFINE_config_file("config", None, "config", lock_config=True)
  flags.FLAGS(["engine_overhead"] + argv)
  cfg = holder.value
  now = mark("config", now)

  par = strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
  parts = {"mesh": time.perf_counter() - now}
  now = mark("build", now)
  run = settings.read(cfg)
  data, info = run.kind.load_splits(run.source, workdir, multihost.barrier)
  now = mark("data_open", now)
  if prepare:
    return {}
  global_batch = cfg.train.per_device_batch_size * par.num_devices
  steps_per_epoch = len(data["train"]) // global_batch
  lr = optim.resolve_schedule(cfg, global_batch, steps_per_epoch,
                              cfg.train.num_steps or cfg.train.num_epochs * steps_per_epoch)
  start = time.perf_counter()
  num_classes = run.source.num_classes(info["labels"])
  state = setup.build_state(run, par, num_classes,
                            data["train"].image.shape[-1], lr.schedule,
                            jax.random.key(cfg.seed))
  parts["model_init_and_optimizer"] = time.perf_counter() - start
  start = time.perf_counter()
  state = par.put_state(state)
  parts["place_state"] = time.perf_counter() - start
  step = par.train_step(functools.partial(step_lib.train_step,
                                         loss_fn=losses.get_loss(cfg.train.loss)))
  par.eval_step(functools.partial(step_lib.eval_step,
                                  num_classes=num_classes))
  now = mark("build", now)

  batches = loader.train_batches(data["train"], global_batch, cfg.seed, 0)
  state, metrics = step(state, par.put_batch(next(batches)), jax.random.key(1))
  jax.block_until_ready(metrics)
  now = mark("first_step", now)
  steady = []
  for _ in range(3):
    start = time.perf_counter()
    state, metrics = step(state, par.put_batch(next(batches)), jax.random.key(1))
    jax.block_until_ready(metrics)
    steady.append(time.perf_counter() - start)
  marks["steady_step"] = sorted(steady)[1]
  return dict(marks, **{f"build/{k}": v for k, v in parts.items()})


def run_config(config: str, overrides: list[str], repeats: int, cache: bool,
               extra_env: dict[str, str]) -> dict:
  """Prepares the data once, then times `repeats` fresh processes; medians per phase.
  With `cache`, the processes share a persistent compilation cache that one untimed
  process fills first, as for a run restarted on the same machine."""
  argv = [f"--config={config}"] + overrides
  with tempfile.TemporaryDirectory() as workdir:
    base = [sys.executable, os.path.abspath(__file__), f"--child={workdir}"] + argv
    env = dict(os.environ, **extra_env)
    if cache:
      env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "jax_cache"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    subprocess.run(base + ["--prepare"], check=True, capture_output=True, text=True, env=env)
    if cache:
      subprocess.run(base, check=True, capture_output=True, text=True, env=env)
    runs = []
    for _ in range(repeats):
      env["MEDSEG_SPAWN_TIME"] = repr(time.time())
      out = subprocess.run(base, check=True, capture_output=True, text=True, env=env).stdout
      runs.append(json.loads(out.strip().splitlines()[-1]))
  median = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
  median["ready_to_train"] = sum(median[p] for p in PHASES)
  median["engine"] = median["config"] + median["build"]
  median["cpu/engine"] = median["cpu/config"] + median["cpu/build"]
  return {"config": config, "overrides": overrides, "repeats": repeats, "cache": cache,
          "env": extra_env, "median_s": median}


def report(result: dict) -> None:
  m = result["median_s"]
  cache = ", warm persistent compilation cache" if result["cache"] else ""
  env = "".join(f", {k}={v}" for k, v in result["env"].items())
  print(f"\n{result['config']} {' '.join(result['overrides'])} "
        f"(median of {result['repeats']} processes{cache}{env})")
  print(f"  {'phase':26} {'wall ms':>9} {'CPU ms':>9}")
  for name in PHASES:
    print(f"  {name:26} {m[name] * 1e3:9.1f} {m['cpu/' + name] * 1e3:9.1f}")
  print(f"  {'ready_to_train':26} {m['ready_to_train'] * 1e3:9.1f}")
  for name in ("mesh", "model_init_and_optimizer", "place_state"):
    print(f"    build: {name:17} {m['build/' + name] * 1e3:9.1f} ms")
  compile_ms = (m["first_step"] - m["steady_step"]) * 1e3
  print(f"  first step minus a steady step (compile): {compile_ms:.0f} ms; "
        f"steady step {m['steady_step'] * 1e3:.0f} ms")
  print(f"  config + build = {m['engine'] * 1e3:.1f} ms wall, {m['cpu/engine'] * 1e3:.1f} ms CPU, "
        f"against the thesis engine's {THESIS_ENGINE_S * 1e3:.0f} ms")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  p.add_argument("--configs", default="configs/quickstart.py",
                 help="comma-separated config files; overrides after a space go with each, "
                      "e.g. 'configs/unet_brats.py --config.data.synthetic=True "
                      "--config.data.root='")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cache", default="both", choices=("off", "on", "both"),
                 help="a warm persistent compilation cache (JAX_COMPILATION_CACHE_DIR)")
  p.add_argument("--env", action="append", default=[],
                 help="KEY=VALUE set for the timed processes, e.g. JAX_THREEFRY_PARTITIONABLE=0")
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
  args, rest = p.parse_known_args()
  if args.child:
    print(json.dumps(child(rest, args.child, args.prepare)))
    return
  bad = [e for e in args.env if "=" not in e]
  if bad:
    sys.exit(f"error: --env={bad[0]}: expected KEY=VALUE")
  extra_env = dict(e.split("=", 1) for e in args.env)
  results = []
  for spec in args.configs.split(","):
    config, *overrides = spec.split()
    for cache in {"off": [False], "on": [True], "both": [False, True]}[args.cache]:
      results.append(run_config(config, overrides, args.repeats, cache, extra_env))
      report(results[-1])
  if args.json:
    print(json.dumps(results))


if __name__ == "__main__":
  main()
