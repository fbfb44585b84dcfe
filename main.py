r"""Trains (or evaluates) one FracTrain run.

  python main.py --config configs/frac_cifar10.py [--workdir DIR] [--config.KEY=VALUE ...]

The recipes in configs/: fp32_, sbm_, pfq_, dfq_ and frac_ for cifar10,
cifar100 and wikitext103 (the Transformer LM), and frac_imagenet.
Common overrides:
  --config.model.name=resnet74          resnet20/38/74/110/152, mobilenet_v2, resnet18/34/50,
                                        resnet8 (small, for smoke runs), transformer_lm, or
                                        package.module:factory, a model of your own
                                        (config.model.options, .blocks, .quantize)
  --config.data.dataset=folder:PATH     or cifar10, cifar100, imagenet2012 (TFDS),
                                        text:PATH (a WikiText folder, the LM's)
  --config.train.iters=2000             iterations (the paper: 64,000)
  --config.train.batch_size=128         global batch
  --config.train.eval_every=390         evaluation interval (and PFQ's indicator epoch)
  --config.dfq.target_cp=3.0            DFQ's target steering cp (FracTrain: the first one)
  --config.dfq.gate=hard                the authors' argmax gate instead of Gumbel-softmax
Example:
  python main.py --config configs/frac_cifar10.py --config.data.dataset=folder:data/cifar10 \
      --config.model.name=resnet20 --config.train.iters=2000

The workdir defaults to runs/<config file name>; running again in the same
workdir resumes from its latest checkpoint (the same method, model, dataset
and precisions; other keys may change). Ctrl-C saves a checkpoint and exits
with status 130; a second Ctrl-C exits at once.
"""

import logging as pylogging
import os
import pathlib
import signal
import sys
import threading

from absl import app
from absl import flags
from ml_collections import config_flags

from fractrain_jax.run import platform

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go "
                    "(default: runs/<config file name>).")
flags.DEFINE_bool("eval_only", False, "Evaluate the workdir's latest checkpoint and exit.")
flags.DEFINE_bool("distributed", False,
                  "Run as one of several processes, JAX detecting the coordinator and ranks "
                  "itself (SLURM, Cloud TPU, Open MPI); implied by the three flags below.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for jax.distributed.initialize (several processes).")
flags.DEFINE_integer("num_processes", None, "How many processes run this job.")
flags.DEFINE_integer("process_id", None, "This process's rank, 0..num_processes-1.")
flags.DEFINE_integer("distributed_timeout", 300,
                     "Seconds to wait for every process to connect to the coordinator before "
                     "giving up (several processes).", lower_bound=1)
flags.DEFINE_bool("compilation_cache", True,
                  "Keep compiled steps in JAX's persistent cache (under the project's cache "
                  "folder), so that a restart or resume of the same config skips the compile.")
flags.mark_flags_as_required(["config"])

# Exit status of a mistake in the command, config, data or workdir.
USAGE_ERROR = 2


def _console_logging(verbose: bool) -> None:
  """This package's INFO lines on stderr, one per event, terminal or not.

  Unless --verbosity is given, the libraries' own lines are off: Orbax's (through
  absl), JAX's search for backends this machine does not have, asyncio's. Errors
  that matter reach the user as this package's one-line messages.
  """
  handler = pylogging.StreamHandler(sys.stderr)
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log = pylogging.getLogger("fractrain_jax")
  log.addHandler(handler)
  log.setLevel(pylogging.INFO)
  log.propagate = False  # Not twice through absl's root handler.
  if not verbose:
    for name in ("absl", "jax._src.xla_bridge", "jax._src.distributed", "asyncio"):
      pylogging.getLogger(name).setLevel(pylogging.CRITICAL)


def _leave_now(signum, frame):
  del frame
  print("Interrupted before training started; nothing to save", file=sys.stderr, flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access


# A start of several processes that takes longer than this says what it waits for.
_WAIT_NOTE_S = 3.0


def _connect(jax, launch: dict) -> None:
  """jax.distributed.initialize, which says nothing while it waits for the other processes:
  after a few seconds this says what it waits for, and after --distributed_timeout it gives
  up in one line (JAX's own limit aborts the process with a C++ stack trace)."""
  limit = FLAGS.distributed_timeout
  if launch:
    count, address = launch.get("num_processes", "?"), launch.get("coordinator_address", "?")
    what = (f"all {count} processes at the coordinator {address} (this is process "
            f"{launch.get('process_id', '?')})")
  else:
    what = "all processes (coordinator and ranks as JAX detects them)"

  def waiting():
    pylogging.getLogger("fractrain_jax").info(
        "Waiting for %s; giving up after %d s (--distributed_timeout)", what, limit)

  def give_up():
    print(f"error: gave up waiting for {what} after {limit} s (--distributed_timeout); "
          "start each with the same --coordinator_address and --num_processes and its own "
          "--process_id", file=sys.stderr, flush=True)
    os._exit(USAGE_ERROR)  # pylint: disable=protected-access

  timers = [threading.Timer(_WAIT_NOTE_S, waiting), threading.Timer(limit, give_up)]
  for timer in timers:
    timer.daemon = True
    timer.start()
  try:
    jax.distributed.initialize(**launch, initialization_timeout=limit + 60)
  finally:
    for timer in timers:
      timer.cancel()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  platform.configure()  # Before JAX starts its backend.
  import jax  # pylint: disable=import-outside-toplevel
  from fractrain_jax import errors  # pylint: disable=import-outside-toplevel
  from fractrain_jax.run import train  # pylint: disable=import-outside-toplevel

  verbose = FLAGS["verbosity"].present
  _console_logging(verbose)
  if not verbose:
    platform.quiet_closed_loop_callbacks()
  if FLAGS.compilation_cache:
    platform.enable_compilation_cache(jax)
  # Until the training loop takes Ctrl-C over (to save first), there is nothing
  # to save: leave at once, without unwinding through JAX or TensorFlow.
  signal.signal(signal.SIGINT, _leave_now)
  launch = {k: FLAGS[k].value for k in ("coordinator_address", "num_processes", "process_id")
            if FLAGS[k].value is not None}
  if launch or FLAGS.distributed:
    _connect(jax, launch)
    if jax.process_index() != 0:  # Process 0 prints the progress; the others only problems.
      pylogging.getLogger("fractrain_jax").setLevel(pylogging.WARNING)
  config_path = flags.FLAGS["config"].config_filename
  workdir = FLAGS.workdir or str(pathlib.Path("runs") / pathlib.Path(config_path).stem)
  pylogging.getLogger("fractrain_jax").info("JAX devices: %s; workdir: %s", jax.devices(), workdir)
  try:
    if FLAGS.eval_only:
      result = train.evaluate_checkpoint(FLAGS.config, workdir)
    else:
      result = train.train_and_evaluate(FLAGS.config, workdir)
  except errors.UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return USAGE_ERROR

  if jax.process_index() == 0:
    print(result)
  if "signal" in result:
    return 128 + result["signal"]  # The shell's convention: 130 after Ctrl-C.
  return 0


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, whose mistakes (a value of the wrong type, an unknown flag) are one
  ``error:`` line and status 2 like every other mistake, not absl's FATAL and status 1."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    print(f"error: {err} (--helpfull lists the flags)", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _early_exit(argv: list[str]) -> int | None:
  """--help, --helpfull and mistakes in the config file or its overrides: one answer each,
  before absl parses anything."""
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    print(__doc__)
    print("Flags:\n  --config, --workdir, --eval_only, --distributed, --nocompilation_cache "
          "(--helpfull lists every flag)")
    return 0
  if "--helpfull" in argv[1:]:
    print(__doc__)
    print(FLAGS.get_help())
    return 0
  from fractrain_jax.run import command_line  # pylint: disable=import-outside-toplevel

  error = command_line.check(argv)
  if error is not None:
    print(f"error: {error}", file=sys.stderr)
    return USAGE_ERROR
  return None


if __name__ == "__main__":
  # config.model.name='package.module:factory' imports from where the command runs, as
  # `python -m` would.
  sys.path.insert(0, os.getcwd())
  status = _early_exit(sys.argv)
  if status is not None:
    sys.exit(status)
  app.run(main, flags_parser=_parse_flags)
