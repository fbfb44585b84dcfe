r"""Trains (or evaluates) one FracTrain run.

  python main.py --config configs/frac_cifar10.py [--workdir DIR] [--config.KEY=VALUE ...]

The recipes in configs/: fp32_, sbm_, pfq_, dfq_ and frac_ for cifar10,
cifar100 and wikitext103 (the Transformer LM), and frac_imagenet.
Common overrides:
  --config.model.name=resnet74          resnet20/38/74/110/152, mobilenet_v2, resnet18/34/50
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

from absl import app
from absl import flags
from ml_collections import config_flags

from fractrain_jax import platform

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go "
                    "(default: runs/<config file name>).")
flags.DEFINE_bool("eval_only", False, "Evaluate the workdir's latest checkpoint and exit.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config"])

# Exit status of a mistake in the command, config, data or workdir.
USAGE_ERROR = 2


def _console_logging() -> None:
  """This package's INFO lines on stderr, one per event, terminal or not."""
  handler = pylogging.StreamHandler(sys.stderr)
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log = pylogging.getLogger("fractrain_jax")
  log.addHandler(handler)
  log.setLevel(pylogging.INFO)
  log.propagate = False  # Not twice through absl's root handler.
  # Orbax logs every checkpoint step through absl at INFO.
  pylogging.getLogger("absl").setLevel(pylogging.WARNING)


def _leave_now(signum, frame):
  del frame
  print("Interrupted before training started; nothing to save", file=sys.stderr, flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  platform.configure()  # Before JAX starts its backend.
  import jax  # pylint: disable=import-outside-toplevel
  from fractrain_jax import errors, train  # pylint: disable=import-outside-toplevel

  _console_logging()
  # Until the training loop takes Ctrl-C over (to save first), there is nothing
  # to save: leave at once, without unwinding through JAX or TensorFlow.
  signal.signal(signal.SIGINT, _leave_now)
  if FLAGS.distributed:
    jax.distributed.initialize()
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

  print(result)
  if "signal" in result:
    return 128 + result["signal"]  # The shell's convention: 130 after Ctrl-C.
  return 0


def _early_exit(argv: list[str]) -> int | None:
  """--help, and a config file that is not there: one answer, before absl parses anything."""
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    print(__doc__)
    print("Flags:\n  --config, --workdir, --eval_only, --distributed "
          "(--helpfull lists every flag)")
    return 0
  for i, arg in enumerate(argv[1:], start=1):
    path = None
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None and not pathlib.Path(path.split(":", 1)[0]).is_file():
      print(f"error: config file {path!r} does not exist; the recipes are in configs/ "
            "(e.g. --config configs/frac_cifar10.py)", file=sys.stderr)
      return USAGE_ERROR
  return None


if __name__ == "__main__":
  status = _early_exit(sys.argv)
  if status is not None:
    sys.exit(status)
  app.run(main)
