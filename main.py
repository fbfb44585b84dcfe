"""Trains (or evaluates) one FracTrain run: `python main.py --config configs/frac_cifar10.py`.

Override any config field on the command line, e.g.
  python main.py --config configs/pfq_cifar100.py --config.model.name=resnet74
The workdir defaults to runs/<config file name>; running again in the same
workdir resumes from its latest checkpoint.
"""

import logging as pylogging
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

from fractrain_jax import platform

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go "
                    "(default: runs/<config file name>).")
flags.DEFINE_bool("eval_only", False, "Evaluate the workdir's latest checkpoint and exit.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  platform.configure()  # Before JAX starts its backend.
  import jax  # pylint: disable=import-outside-toplevel
  from fractrain_jax import train  # pylint: disable=import-outside-toplevel

  # Orbax logs every checkpoint step through absl at INFO: keep the console to
  # the progress bar and this project's own messages.
  pylogging.getLogger("absl").setLevel(pylogging.WARNING)
  log = pylogging.getLogger("fractrain_jax")
  log.setLevel(pylogging.INFO)
  if FLAGS.distributed:
    jax.distributed.initialize()
  config_path = flags.FLAGS["config"].config_filename
  workdir = FLAGS.workdir or str(pathlib.Path("runs") / pathlib.Path(config_path).stem)
  log.info("JAX devices: %s; workdir: %s", jax.devices(), workdir)
  if FLAGS.eval_only:
    result = train.evaluate_checkpoint(FLAGS.config, workdir)
  else:
    result = train.train_and_evaluate(FLAGS.config, workdir)
  print(result)


if __name__ == "__main__":
  app.run(main)
