"""Recipe files load as main.py loads them, hold the paper's values, and validate.

Bad values are refused by ``config_check.validate`` with the key in the message.
"""

import io
import pathlib
import re
import sys
import tokenize
import types

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from fractrain_jax.run import config_check

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
RECIPES = ("default", "fp32_cifar10", "fp32_cifar100", "sbm_cifar10",
           "sbm_cifar100", "pfq_cifar10", "pfq_cifar100", "dfq_cifar10",
           "dfq_cifar100", "frac_cifar10", "frac_cifar100", "frac_imagenet",
           "fp32_wikitext103", "sbm_wikitext103", "pfq_wikitext103", "dfq_wikitext103",
           "frac_wikitext103")
# The backbone names of the config schema.
SCHEMA_MODELS = ("resnet20", "resnet38", "resnet74", "resnet110", "resnet152",
                 "mobilenet_v2", "resnet18", "resnet34", "resnet50")


@pytest.fixture(autouse=True)
def model_names(monkeypatch):
  """The real ``models.available()``, or the schema's names until it exists."""
  try:
    from fractrain_jax.models import available  # pylint: disable=g-import-not-at-top
    return tuple(available())
  except ImportError:
    fake = types.ModuleType("fractrain_jax.models")
    fake.available = lambda: SCHEMA_MODELS
    monkeypatch.setitem(sys.modules, "fractrain_jax.models", fake)
    return SCHEMA_MODELS


def load(name: str, *overrides: str) -> ml_collections.ConfigDict:
  """Loads configs/<name>.py through config_flags, exactly as main.py does."""
  argv = ["main.py", f"--config={CONFIG_DIR / (name + '.py')}", *overrides]
  flag_values = flags.FlagValues()
  # sys_argv: overrides are found in argv (main.py's real sys.argv), not pytest's.
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_recipe_list_is_complete():
  on_disk = {p.stem for p in CONFIG_DIR.glob("*.py")} - {"__init__"}
  assert on_disk == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_validates(name):
  config = load(name)
  config_check.validate(config)
  # Every recipe carries every key of the default, and no other.
  assert set(_leaves(config)) == set(_leaves(load("default")))


@pytest.mark.parametrize("name", RECIPES)
def test_every_setting_is_commented(name):
  """Each ``config.x = value`` line has a comment on it or just above it."""
  # The default recipe's settings are the library's schema, fractrain_jax/defaults.py.
  path = REPO / "fractrain_jax" / "defaults.py" if name == "default" else CONFIG_DIR / f"{name}.py"
  source = path.read_text()
  comment_lines = {
      tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
      if tok.type == tokenize.COMMENT}
  lines = source.splitlines()
  setting = re.compile(r"^\s*config(\.\w+)+ = (?!ml_collections\.ConfigDict\(\))")
  checked = 0
  for number, line in enumerate(lines, start=1):
    if setting.match(line):
      checked += 1
      assert number in comment_lines or number - 1 in comment_lines, (
          f"{name}.py line {number} has no comment: {line.strip()}")
  assert checked >= 1


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "default"])
def test_recipe_docstring_gives_its_command(name):
  config_module = (CONFIG_DIR / f"{name}.py").read_text()
  assert f"python main.py --config configs/{name}.py" in config_module
  assert "--config." in config_module  # an override example


def test_default_is_the_paper_cifar_recipe():
  c = load("default")
  assert c.method == "fp32"
  assert (c.model.name, c.data.dataset) == ("resnet38", "cifar10")
  assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 1e-4)
  assert (c.train.batch_size, c.train.iters, c.train.eval_every) == (128, 64000, 390)
  assert tuple(c.optim.boundaries) == (32000, 48000)
  assert (c.optim.schedule, c.optim.decay) == ("piecewise", 0.1)
  assert c.data.data_dir is None


EXPECTED = {
    "fp32_cifar10": {"method": "fp32", "data.dataset": "cifar10"},
    "fp32_cifar100": {"method": "fp32", "data.dataset": "cifar100"},
    "sbm_cifar10": {"method": "static", "data.dataset": "cifar10",
                    "quant.fw_bits": 8, "quant.bw_bits": 8},
    "sbm_cifar100": {"method": "static", "data.dataset": "cifar100",
                     "quant.fw_bits": 8, "quant.bw_bits": 8},
    "pfq_cifar10": {"method": "pfq", "data.dataset": "cifar10",
                    "pfq.fw_schedule": (3, 4, 6, 8), "pfq.bw_schedule": (6, 6, 8, 8),
                    "pfq.eps": 0.05, "pfq.alpha": 0.3, "pfq.num_turning_points": 3},
    "pfq_cifar100": {"method": "pfq", "data.dataset": "cifar100",
                     "pfq.fw_schedule": (3, 4, 6, 8), "pfq.bw_schedule": (6, 6, 8, 8),
                     "pfq.eps": 0.05, "pfq.alpha": 0.3, "pfq.num_turning_points": 3},
    "dfq_cifar10": {"method": "dfq", "data.dataset": "cifar10",
                    "dfq.target_cp": 3.0, "dfq.weight_bits": 4,
                    "dfq.fw_candidates": (3, 4, 4, 6, 6),
                    "dfq.bw_candidates": (6, 6, 8, 8, 12)},
    "dfq_cifar100": {"method": "dfq", "data.dataset": "cifar100",
                     "dfq.target_cp": 3.0, "dfq.weight_bits": 4,
                     "dfq.fw_candidates": (3, 4, 4, 6, 6),
                     "dfq.bw_candidates": (6, 6, 8, 8, 12)},
    "frac_cifar10": {"method": "frac", "data.dataset": "cifar10",
                     "dfq.target_cp": 1.5, "dfq.target_step": 0.5,
                     "dfq.weight_bits": 4, "pfq.eps": 0.05, "pfq.alpha": 0.3,
                     "pfq.num_turning_points": 3},
    "frac_cifar100": {"method": "frac", "data.dataset": "cifar100",
                      "dfq.target_cp": 1.5, "dfq.target_step": 0.5,
                      "dfq.weight_bits": 4, "pfq.eps": 0.05, "pfq.alpha": 0.3,
                      "pfq.num_turning_points": 3},
    "frac_imagenet": {
        "method": "frac", "model.name": "resnet18", "data.dataset": "imagenet2012",
        "dfq.weight_bits": 6, "dfq.target_cp": 3.0, "dfq.target_step": 0.5,
        "dfq.fw_candidates": (3, 4, 6, 8), "dfq.bw_candidates": (6, 8, 12, 16),
        "train.batch_size": 256, "optim.lr": 0.1, "optim.decay": 0.1,
        # ceil(1,281,167 / 256) = 5005 iterations per epoch, 90 epochs,
        # lr x0.1 after epochs 30 and 60.
        "train.eval_every": 5005, "train.iters": 90 * 5005,
        "optim.boundaries": (30 * 5005, 60 * 5005)},
    "fp32_wikitext103": {"method": "fp32", "model.name": "transformer_lm",
                         "data.dataset": "text:data/wikitext-103", "optim.name": "adamw"},
    "sbm_wikitext103": {"method": "static", "model.name": "transformer_lm",
                        "quant.fw_bits": 8, "quant.bw_bits": 8, "optim.name": "adamw"},
    "pfq_wikitext103": {"method": "pfq", "model.name": "transformer_lm",
                        "pfq.fw_schedule": (4, 6, 8), "pfq.bw_schedule": (6, 8, 8),
                        "pfq.num_turning_points": 2, "optim.name": "adamw"},
    "dfq_wikitext103": {"method": "dfq", "model.name": "transformer_lm",
                        "dfq.fw_candidates": (4, 6, 8), "dfq.bw_candidates": (6, 8, 8),
                        "dfq.weight_bits": 8, "dfq.target_cp": 4.8, "dfq.forward": "single",
                        "optim.name": "adamw"},
    "frac_wikitext103": {"method": "frac", "model.name": "transformer_lm",
                         "dfq.fw_candidates": (4, 6, 8), "dfq.bw_candidates": (6, 8, 8),
                         "dfq.weight_bits": 8, "dfq.target_cp": 3.6, "dfq.target_step": 0.6,
                         "pfq.num_turning_points": 2, "pfq.eps": 0.05, "pfq.alpha": 0.3,
                         "quant.act_momentum": 0.9, "optim.name": "adamw"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_values(name):
  leaves = _leaves(load(name))
  for key, value in EXPECTED[name].items():
    got = leaves[key]
    assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, key


def test_imagenet_epoch_covers_the_training_set():
  steps = load("frac_imagenet").train.eval_every
  assert (steps - 1) * 256 < 1_281_167 <= steps * 256


def test_command_line_override_reaches_the_config():
  config = load("frac_cifar10", "--config.dfq.target_cp=2.0",
                "--config.data.data_dir=/tmp/tfds", "--config.model.name=resnet74")
  assert (config.dfq.target_cp, config.data.data_dir) == (2.0, "/tmp/tfds")
  config_check.validate(config)


def _leaves(config, prefix=""):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _with(method, key, value):
  """The default config, made untyped so any bad value can be set."""
  config = ml_collections.ConfigDict(load("default").to_dict(), type_safe=False)
  config.method = method
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  return config


BAD = [
    ("fp32", "method", "sgd"),
    ("fp32", "seed", 1.5),
    ("fp32", "model.name", "resnet39"),
    ("dfq", "model.name", "gated_resnet38"),
    ("fp32", "data.dataset", "mnist"),
    ("fp32", "data.dataset", "folder:"),
    ("fp32", "data.data_dir", 3),
    ("fp32", "data.train_subset", -1),
    ("fp32", "data.download", "yes"),
    ("fp32", "train.iters", 0),
    ("fp32", "train.iters", 100.0),
    ("fp32", "train.batch_size", 0),
    ("fp32", "train.batch_size", -128),
    ("fp32", "train.eval_every", 0),
    ("fp32", "train.eval_batch_size", 0),
    ("fp32", "train.log_every", 0),
    ("fp32", "train.finetune_iters", -1),
    ("fp32", "optim.lr", 0.0),
    ("fp32", "optim.momentum", 1.0),
    ("fp32", "optim.weight_decay", -1e-4),
    ("fp32", "optim.schedule", "step"),
    ("fp32", "optim.boundaries", (48000, 32000)),
    ("fp32", "optim.boundaries", (32000, 32000)),
    ("fp32", "optim.boundaries", (0, 100)),
    ("fp32", "optim.decay", 0.0),
    ("fp32", "optim.warmup_iters", -1),
    ("fp32", "optim.warmup_iters", 64000),
    ("fp32", "optim.warmup_lr", -0.01),
    ("static", "quant.fw_bits", 0),
    ("static", "quant.fw_bits", 33),
    ("static", "quant.bw_bits", 8.0),
    ("static", "quant.bw_bits", True),
    ("static", "quant.act_momentum", 1.0),
    ("pfq", "pfq.fw_schedule", (3, 4, 6, 40)),
    ("pfq", "pfq.bw_schedule", (6, 6, 8, 0)),
    ("pfq", "pfq.fw_schedule", (3, 4, 6.5, 8)),
    ("pfq", "pfq.fw_schedule", ()),
    ("pfq", "pfq.bw_schedule", (6, 8, 8)),  # disagrees with fw_schedule
    ("pfq", "pfq.num_turning_points", 2),  # 4 stages need 3
    ("pfq", "pfq.num_turning_points", -1),
    ("pfq", "pfq.eps", -0.05),
    ("pfq", "pfq.alpha", 0.0),
    ("pfq", "pfq.window", 1),
    ("pfq", "pfq.scale_epochs", 0),
    ("dfq", "dfq.weight_bits", 0),
    ("dfq", "dfq.weight_bits", 64),
    ("dfq", "dfq.fw_candidates", (3, 4, 4, 6, 33)),
    ("dfq", "dfq.bw_candidates", (6, 6, 8, 8)),  # 4 against 5
    ("dfq", "dfq.target_cp", 0.0),
    ("dfq", "dfq.target_cp", 100.5),
    ("frac", "dfq.target_step", -0.5),
    ("frac", "dfq.target_step", 40.0),  # 3 + 3 * 40 > 100
    ("dfq", "dfq.beta", -1e-3),
    ("dfq", "dfq.relax", -0.1),
    ("frac", "dfq.range", -0.1),
    ("dfq", "dfq.gate", "softmax"),
    ("dfq", "dfq.tau_start", 0.0),
    ("dfq", "dfq.tau_end", -1.0),
    ("dfq", "dfq.cost_weighting", "flops"),
    ("dfq", "dfq.forward", "twice"),
    ("frac", "dfq.gate_head", "wide"),
    ("dfq", "dfq.gate_init", "torch"),
    ("fp32", "checkpoint.keep", 0),
]


@pytest.mark.parametrize("method,key,value", BAD, ids=[f"{k}={v!r}" for _, k, v in BAD])
def test_bad_value_is_refused_with_its_name(method, key, value):
  config = _with(method, key, value)
  with pytest.raises(ValueError, match=re.escape(key)):
    config_check.validate(config)


@pytest.mark.parametrize("key,nearest", [
    ("optim.learning_rate", "optim.lr"),      # The initials of its words.
    ("optim.wd", "optim.weight_decay"),        # And the other way round.
    ("train.num_iters", "train.iters"),       # The closest spelling.
    ("trian", "train"),                       # A whole section.
])
def test_a_key_the_schema_lacks_is_refused_naming_the_nearest(key, nearest):
  config = _with("fp32", key, 0.01)
  with pytest.raises(ValueError) as info:
    config_check.validate(config)
  assert str(info.value) == f"unknown config key config.{key}; did you mean config.{nearest}?"


def test_good_variants_pass():
  # Accepted edge values, so the refusals above are not over-eager.
  for method, key, value in [
      ("fp32", "data.dataset", "folder:/data/cifar10"),
      ("fp32", "optim.boundaries", ()),
      ("fp32", "optim.schedule", "cosine"),
      ("pfq", "pfq.fw_schedule", (2, 4, 8, 32)),
      ("dfq", "dfq.target_cp", 100.0),
      ("dfq", "dfq.forward", "per_candidate"),
      ("frac", "dfq.gate_head", "imagenet"),
      ("dfq", "dfq.gate_init", "authors"),
      # FracTrain does not read the PFQ schedules, so their stage count is free.
      ("frac", "pfq.num_turning_points", 5),
  ]:
    config_check.validate(_with(method, key, value))


def test_bad_value_message_names_value_and_accepted_set():
  with pytest.raises(ValueError) as info:
    config_check.validate(_with("fp32", "optim.schedule", "step"))
  message = str(info.value)
  assert "'step'" in message and "piecewise" in message and "cosine" in message


def test_unknown_model_lists_available_names(model_names):
  with pytest.raises(ValueError) as info:
    config_check.validate(_with("fp32", "model.name", "resnet39"))
  assert all(name in str(info.value) for name in model_names)


def test_missing_key_is_named():
  config = _with("fp32", "train.iters", 1)
  del config.train["eval_every"]
  with pytest.raises(ValueError, match=r"train\.eval_every.*missing"):
    config_check.validate(config)


def test_check_workdir_creates_and_leaves_it_empty(tmp_path):
  target = tmp_path / "a" / "b"
  got = config_check.check_workdir(str(target))
  assert got == target and got.is_absolute() and got.is_dir()
  assert list(got.iterdir()) == []  # the probe file is gone


@pytest.mark.parametrize("where", ["is_file", "under_file"])
def test_check_workdir_refuses_unwritable_path(tmp_path, where):
  blocker = tmp_path / "blocker"
  blocker.write_text("not a directory")
  path = blocker if where == "is_file" else blocker / "run"
  with pytest.raises(ValueError, match=re.escape(str(path))):
    config_check.check_workdir(path)
