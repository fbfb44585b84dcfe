"""The model registry and the plain backbones: sizes, MACs, precision routing, train/eval state.

Big models are only built abstractly (nnx.eval_shape) and traced, never run;
behaviour is checked on ResNet-20 at 8x8 or 16x16 inputs.
"""

from __future__ import annotations

import functools
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fractrain_jax import models
from fractrain_jax.cost import LayerMACs
from fractrain_jax.layers import (BRANCH, DEPTHWISE, OUTER, SHORTCUT, CostRecord, Dense, GatedBits,
                                  QConv, StaticBits)
from fractrain_jax.models.capture import capture_layer_macs

BACKBONES = ("resnet8", "resnet20", "resnet38", "resnet74", "resnet110", "resnet152", "mobilenet_v2",
             "resnet18", "resnet34", "resnet50")


def n_params(module) -> int:
  return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


@functools.lru_cache(maxsize=None)
def _abstract(name: str, num_classes: int):
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0)))


def abstract(name: str, num_classes: int = 10):
  """The model with shapes only (nothing initialized or run), in training mode."""
  model = nnx.clone(_abstract(name, num_classes))  # Building deep models costs seconds.
  model.train()
  return model


def images(batch: int, size: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


# ------------------------------------------------------------------ registry


def test_registry_names():
  assert models.available() == BACKBONES
  assert set(models.names()) == (set(BACKBONES) | {f"gated_{n}" for n in BACKBONES}
                                 | {models.LM, "gated_" + models.LM})


def test_unknown_name_lists_accepted_names():
  with pytest.raises(ValueError, match="resnet20.*gated_resnet50"):
    models.create("resnet21", num_classes=10, rngs=nnx.Rngs(0))


def test_plain_model_refuses_gate_options():
  with pytest.raises(ValueError, match="gated_resnet20"):
    models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0), weight_bits=4)


@pytest.mark.parametrize("name", BACKBONES)
def test_image_size_and_block_count(name):
  plain = abstract(name)
  # Gated models share the backbone's counts; one of each family keeps this test fast.
  family = ("resnet20", "mobilenet_v2", "resnet18", "resnet50")
  gated = abstract(f"gated_{name}") if name in family else plain
  cifar_blocks = {"resnet8": 3, "resnet20": 9, "resnet38": 18, "resnet74": 36, "resnet110": 54,
                  "resnet152": 75, "mobilenet_v2": 1 + 2 + 3 + 4 + 3 + 3 + 1}
  imagenet_blocks = {"resnet18": 8, "resnet34": 16, "resnet50": 16}
  want_blocks = {**cifar_blocks, **imagenet_blocks}[name]
  want_size = 32 if name in cifar_blocks else 224
  for m in (plain, gated):
    assert m.image_size == want_size
    assert m.num_blocks == want_blocks


@pytest.mark.parametrize("name", ["resnet20", "gated_resnet20"])
def test_act_momentum_option(name):
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0), act_momentum=0.5)
  convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, QConv)]
  assert len(convs) == 21 and all(c.act_momentum == 0.5 for c in convs)
  x = images(2, 8)
  if name.startswith("gated"):
    # The gated stem runs in FP32 and keeps no range: look at block 0, which reads the stem.
    model(x, key=jax.random.key(0))
    conv = model.backbone.blocks[0].conv1.conv
    seen = model.backbone.stem(x, None, key=None)
  else:
    model(x, (4, 8), key=jax.random.key(0))
    conv, seen = model.stem.conv_bn.conv, x
  # From zero: m * 0 + (1 - m) * (max - min) of the conv's input batch.
  np.testing.assert_allclose(conv.act_range[...], 0.5 * float(seen.max() - seen.min()),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="act_momentum"):
    models.create(name, num_classes=10, rngs=nnx.Rngs(0), act_momentum=1.0)


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("name, num_classes, want", [
    ("resnet20", 10, 272_474),
    ("resnet38", 10, 564_122),
    ("resnet74", 10, 1_147_418),
    ("resnet38", 100, 569_972),
    ("mobilenet_v2", 10, 2_296_922),
    ("resnet18", 1000, 11_689_512),   # torchvision
    ("resnet34", 1000, 21_797_672),   # torchvision
    ("resnet50", 1000, 25_557_032),   # torchvision
])
def test_parameter_count(name, num_classes, want):
  assert n_params(abstract(name, num_classes)) == want


def _cifar_resnet_params(depth: int, num_classes: int) -> int:
  """Parameters of a CIFAR ResNet from its layout: convs (no bias), BN scale + bias, dense."""
  n = (depth - 2) // 6
  conv_bn = lambda k, cin, cout: k * k * cin * cout + 2 * cout
  total = conv_bn(3, 3, 16) + 64 * num_classes + num_classes
  cin = 16
  for c in (16, 32, 64):
    for i in range(n):
      total += conv_bn(3, cin, c) + conv_bn(3, c, c)
      if cin != c:
        total += conv_bn(1, cin, c)
      cin = c
  return total


@pytest.mark.parametrize("depth", [8, 20, 38, 74, 110, 152])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_resnet_parameter_count_from_layout(depth, num_classes):
  assert n_params(abstract(f"resnet{depth}", num_classes)) == _cifar_resnet_params(
      depth, num_classes)


def test_batch_stats_are_not_parameters():
  m = abstract("resnet20")
  stats = nnx.to_flat_state(nnx.state(m, nnx.BatchStat))
  # 21 convs (stem, 18 in blocks, 2 shortcuts), each with act_lo and act_range and a BN
  # with running mean and var; none of them is a Param.
  assert sorted({path[-1] for path, _ in stats}) == ["act_lo", "act_range", "mean", "var"]
  assert len(stats) == 21 * 4
  params = {path for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert not params & {path for path, _ in stats}


# The authors' gate layouts: (hidden 1x1 conv width or None, embedding width, LSTM hidden size).
_GATE_LAYOUTS = {"cifar": (32, 16, 16), "imagenet": (None, 40, 20), "mobilenet": (64, 32, 32)}


def _gate_head_params(channels: int, layout: str) -> int:
  """GAP -> [1x1 conv (with bias) to hidden -> ReLU ->] 1x1 conv (with bias) to the embedding."""
  hidden, embed, _ = _GATE_LAYOUTS[layout]
  if hidden is None:
    return channels * embed + embed
  return channels * hidden + hidden + hidden * embed + embed


def _decision_channels(name: str) -> list[int]:
  """Channels of what each decision reads: the stem, then blocks 0..L-2, from the paper."""
  if name.startswith("resnet") and name[6:] in ("20", "38", "74", "110", "152"):
    n = (int(name[6:]) - 2) // 6
    outs = [16] * n + [32] * n + [64] * n
    return [16] + outs[:-1]
  if name == "mobilenet_v2":
    cfg = ((16, 1), (24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1))
    outs = [c for c, n in cfg for _ in range(n)]
    return [32] + outs[:-1]
  counts = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}[name]
  expansion = 4 if name == "resnet50" else 1
  outs = [w * expansion for w, n in zip((64, 128, 256, 512), counts) for _ in range(n)]
  return [64] + outs[:-1]


def test_gated_resnet38_gate_heads():
  m = abstract("gated_resnet38")
  # The 32,656 counts a 19th head after the last block, whose decision no
  # block uses (7x1072 + 6x1584 + 6x2608); we build only the 18 used heads.
  assert n_params(m.gate.heads) == 32_656 - 2_608 == 30_048


@pytest.mark.parametrize("name, num_classes, k", [
    ("resnet38", 10, 5), ("resnet20", 100, 5), ("mobilenet_v2", 10, 5), ("resnet18", 1000, 4),
])
def test_gated_parameter_count(name, num_classes, k):
  gated = abstract(f"gated_{name}", num_classes)
  backbone = n_params(abstract(name, num_classes))
  # The authors' layout for each model (fractrain_cifar/models.py:416, 730;
  # fractrain_imagenet/models.py:289).
  layout = {"mobilenet_v2": "mobilenet", "resnet18": "imagenet"}.get(name, "cifar")
  assert gated.gate_head == layout
  heads = sum(_gate_head_params(c, layout) for c in _decision_channels(name))
  # nnx.LSTMCell(embed, hidden): input kernels 4 x embed x hidden, recurrent kernels
  # 4 x hidden x hidden, one bias 4 x hidden (PyTorch's nn.LSTM has a second, redundant
  # bias).
  _, embed, hidden = _GATE_LAYOUTS[layout]
  lstm = 4 * (embed * hidden) + 4 * (hidden * hidden + hidden)
  projection = hidden * k + k
  assert gated.num_blocks == len(_decision_channels(name))
  assert gated.num_candidates == k
  assert n_params(gated) == backbone + heads + lstm + projection


def test_gated_candidate_defaults_by_input_size():
  cifar, imagenet = abstract("gated_resnet20"), abstract("gated_resnet18")
  assert (cifar.fw_candidates, cifar.bw_candidates, cifar.weight_bits) == (
      (3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4)
  assert (imagenet.fw_candidates, imagenet.bw_candidates, imagenet.weight_bits) == (
      (3, 4, 6, 8), (6, 8, 12, 16), 6)


@pytest.mark.parametrize("options, match", [
    ({"fw_candidates": (4, 8), "bw_candidates": (8,)}, "equal length"),
    ({"fw_candidates": (4, 40), "bw_candidates": (8, 8)}, "outside"),
    ({"weight_bits": 4.0}, "Python ints"),
    ({"gate": "softmax"}, "gumbel"),
])
def test_gated_option_errors(options, match):
  with pytest.raises(ValueError, match=match):
    models.create("gated_resnet20", num_classes=10, rngs=nnx.Rngs(0), **options)


# ------------------------------------------------------------------ MACs


def _cifar_resnet_macs(depth: int, num_classes: int = 10) -> dict[str, list[int]]:
  """Per-sample forward MACs of a CIFAR ResNet from the architecture, by layer type."""
  n = (depth - 2) // 6
  out = {"stem": [32 * 32 * 3 * 3 * 3 * 16], "branch": [], "shortcut": [],
         "classifier": [64 * num_classes]}
  hw, cin = 32, 16
  for stage, c in enumerate((16, 32, 64)):
    for i in range(n):
      stride = 2 if stage > 0 and i == 0 else 1
      hw_out = hw // stride
      out["branch"] += [hw_out**2 * 9 * cin * c, hw_out**2 * 9 * c * c]
      if stride != 1 or cin != c:
        out["shortcut"].append(hw_out**2 * cin * c)
      hw, cin = hw_out, c
  return out


def test_resnet20_layer_macs_by_hand():
  layers = abstract("resnet20").layer_macs()
  want = _cifar_resnet_macs(20)
  convs = [l for l in layers if l.name != "classifier"]
  conv_total = sum(l.macs for l in convs)
  assert conv_total == sum(want["stem"]) + sum(want["branch"]) + sum(want["shortcut"])
  assert conv_total == 40_550_400 + 262_144  # ~40.8M: 3x3 convs plus the two 1x1 shortcuts.
  assert [l.macs for l in layers if l.name == "classifier"] == want["classifier"]
  assert [l.macs for l in layers if ".conv" in l.name] == want["branch"]
  assert [l.macs for l in layers if l.name.endswith("shortcut")] == want["shortcut"]
  assert all(l.kind == "static" for l in convs)
  assert layers[-1].kind == "fp"


def test_gated_resnet20_layer_kinds():
  layers = abstract("gated_resnet20").layer_macs()
  plain = abstract("resnet20").layer_macs()
  assert [(l.name, l.macs) for l in layers] == [(l.name, l.macs) for l in plain]
  by_name = {l.name: l for l in layers}
  assert by_name["stem"].kind == "fp" and by_name["classifier"].kind == "fp"
  shortcuts = [l for l in layers if l.name.endswith("shortcut")]
  assert len(shortcuts) == 2 and all(l.kind == "fp" for l in shortcuts)
  gated = [l for l in layers if l.kind == "gated"]
  assert len(gated) == 18
  assert [l.block for l in gated] == [b for b in range(9) for _ in range(2)]
  assert all(l.name.startswith(f"blocks.{l.block}.") for l in gated)


def test_mobilenet_v2_layer_kinds():
  plain = abstract("mobilenet_v2").layer_macs()
  gated = abstract("gated_mobilenet_v2").layer_macs()
  for layers in (plain, gated):
    dw = [l for l in layers if "depthwise" in l.name]
    assert len(dw) == 17
    assert all(l.kind == "fixed" and l.fixed == (8, 16, 8) for l in dw)
  assert {l.kind for l in plain if "depthwise" not in l.name and l.name != "classifier"} == {
      "static"}
  kinds = {l.name: l.kind for l in gated}
  assert kinds["stem"] == kinds["head_conv"] == kinds["classifier"] == "fp"
  assert {kinds[f"blocks.{b}.{c}"] for b in range(17) for c in ("expand", "project")} == {
      "gated"}


def _traced_macs(model, size: int) -> list[int]:
  """MACs per sample of every conv and dense op in the traced FP32 forward, in order."""
  model.eval()
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda s, v: nnx.merge(graphdef, s)(v))(state, x).jaxpr
  macs = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kh, kw, cin_per_group, _ = eqn.invars[1].aval.shape   # HWIO
      macs.append(math.prod(eqn.outvars[0].aval.shape) * kh * kw * cin_per_group)
    elif eqn.primitive.name == "dot_general":
      macs.append(math.prod(eqn.invars[1].aval.shape))
    else:
      assert not eqn.params.get("jaxpr"), "nested jaxprs would hide layers from this count"
  return macs


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "resnet18", "resnet50"])
def test_layer_macs_match_the_traced_graph(name):
  model = abstract(name)
  assert [l.macs for l in model.layer_macs()] == _traced_macs(model, model.image_size)


class _TinyBlock(nnx.Module):
  def __init__(self, in_features: int, *, strides: int, rngs: nnx.Rngs):
    out = 2 * in_features
    self.branch = QConv(in_features, out, 3, strides=strides, role=BRANCH, rngs=rngs)
    self.shortcut = QConv(in_features, out, 1, strides=strides, role=SHORTCUT, rngs=rngs)

  def __call__(self, x):
    return self.branch(x) + self.shortcut(x)


class _TinyNet(nnx.Module):
  """Not a registry model and no cost code of its own; attribute order is not call order."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = QConv(3, 4, 3, role=OUTER, rngs=rngs)
    self.blocks = nnx.List([_TinyBlock(4, strides=2, rngs=rngs),
                            _TinyBlock(8, strides=1, rngs=rngs)])
    self.dw = QConv(16, 16, 3, feature_group_count=16, role=DEPTHWISE, rngs=rngs)
    self.fc = Dense(16, 5, rngs=rngs)

  def __call__(self, x):
    h = self.stem(x)
    for block in self.blocks:
      h = block(h)
    return self.fc(jnp.mean(self.dw(h), axis=(1, 2)))


def test_custom_module_gets_its_cost_table_by_capture():
  net = _TinyNet(nnx.Rngs(0))
  # By hand, 12x12 input: stem 12x12 (pad 1), both blocks at 6x6 after block 0's stride 2.
  # (name, MACs, plain kind, gated kind, gated block)
  want = [("stem", 12 * 12 * 9 * 3 * 4, "static", "fp", -1),
          ("blocks.0.branch", 6 * 6 * 9 * 4 * 8, "static", "gated", 0),
          ("blocks.0.shortcut", 6 * 6 * 1 * 4 * 8, "static", "fp", -1),
          ("blocks.1.branch", 6 * 6 * 9 * 8 * 16, "static", "gated", 1),
          ("blocks.1.shortcut", 6 * 6 * 1 * 8 * 16, "static", "fp", -1),
          ("dw", 6 * 6 * 9 * 1 * 16, "fixed", "fixed", -1),
          ("fc", 16 * 5, "fp", "fp", -1)]
  fixed = lambda kind: (8, 16, 8) if kind == "fixed" else None
  forward = lambda m, x: m(x)
  plain = capture_layer_macs(net, forward, (1, 12, 12, 3))
  assert plain == [LayerMACs(name, macs, kind, fixed=fixed(kind))
                   for name, macs, kind, _, _ in want]
  gated = capture_layer_macs(net, forward, (1, 12, 12, 3), gated=(BRANCH,))
  assert gated == [LayerMACs(name, macs, kind, block=block, fixed=fixed(kind))
                   for name, macs, _, kind, block in want]
  # The per-candidate forward also charges projection shortcuts to their block.
  both = capture_layer_macs(net, forward, (1, 12, 12, 3), gated=(BRANCH, SHORTCUT))
  assert both == [LayerMACs(name, macs, "gated" if ".shortcut" in name else kind,
                            block=(int(name[7]) if ".shortcut" in name else block),
                            fixed=fixed(kind))
                  for name, macs, _, kind, block in want]


def _has_cost_records(tree) -> bool:
  leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return any(isinstance(v, (CostRecord, nnx.Intermediate)) for v in leaves)


@pytest.mark.parametrize("name", ["resnet8", "gated_resnet8"])
def test_capture_leaves_no_state_behind(name):
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  before = jax.tree.structure(nnx.state(model))
  assert model.layer_macs()
  _, params, rest = nnx.split(model, nnx.Param, ...)  # The train step's split.
  assert not _has_cost_records(params) and not _has_cost_records(rest)
  assert jax.tree.structure(nnx.state(model)) == before
  assert not any(hasattr(m, "__captures__") for _, m in nnx.iter_modules(model))


def test_ordinary_forward_records_nothing():
  model = models.create("resnet8", num_classes=10, rngs=nnx.Rngs(0))
  before = jax.tree.structure(nnx.state(model))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # A sow outside nnx.capture warns (and stores).
    model(images(2, 8), (4, 8), key=jax.random.key(0))
  assert jax.tree.structure(nnx.state(model)) == before


# ------------------------------------------------------------------ precision routing


@pytest.fixture
def record_bits(monkeypatch):
  """Records (feature_group_count, bits, key) of every QConv call."""
  calls = []
  original = QConv.__call__

  def spy(self, x, bits=None, *, key=None):
    calls.append((self.feature_group_count, bits, key))
    return original(self, x, bits, key=key)

  monkeypatch.setattr(QConv, "__call__", spy)
  return calls


def _trace(model, fn, *args):
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda s, *a: fn(nnx.merge(graphdef, s), *a), state, *args)


# MobileNetV2: stem, 17 x (expand, depthwise, project), 4 projection shortcuts, head conv.
@pytest.mark.parametrize("name, n_convs, bits", [
    ("resnet20", 21, None), ("resnet20", 21, (4, 8)), ("resnet20", 21, (6, 12)),
    ("mobilenet_v2", 1 + 17 * 3 + 4 + 1, (4, 8)),
])
def test_static_bits_reach_every_conv(record_bits, name, n_convs, bits):
  model = abstract(name)
  _trace(model, lambda m, x, k: m(x, bits, key=k), images(2, 32), jax.random.key(0))
  assert len(record_bits) == n_convs
  for groups, got, _ in record_bits:
    if bits is None:
      assert got is None
    elif groups > 1:
      assert got == StaticBits(8, 16, 8)
    else:
      assert got == StaticBits(bits[0], bits[1], bits[0])


def test_every_conv_gets_its_own_rounding_key(record_bits):
  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  model.eval()  # Keys are handed down in eval too; nothing is rounded, so this is cheap.

  def conv_keys(key, seed):
    record_bits.clear()
    model(images(2, 8, seed), (4, 8), key=key)
    return [tuple(np.asarray(jax.random.key_data(k)).ravel()) for _, _, k in record_bits]

  first = conv_keys(jax.random.key(3), 0)
  assert len(first) == 21 and len(set(first)) == 21
  assert conv_keys(jax.random.key(3), 1) == first  # Fixed by the key and the conv's place.
  assert not set(conv_keys(jax.random.key(4), 0)) & set(first)


@pytest.mark.parametrize("name, n_gated, n_fp, n_depthwise", [
    ("gated_resnet20", 18, 1 + 2, 0),           # FP: stem, 2 shortcuts.
    ("gated_mobilenet_v2", 34, 1 + 4 + 1, 17),  # FP: stem, 4 shortcuts, head conv.
])
def test_gated_precision_routing(record_bits, name, n_gated, n_fp, n_depthwise):
  model = abstract(name)
  _trace(model, lambda m, x, k: m(x, key=k), images(2, 32), jax.random.key(0))
  assert len(record_bits) == n_gated + n_fp + n_depthwise
  assert record_bits[0][1] is None  # The stem.
  gated = [b for _, b, _ in record_bits if isinstance(b, GatedBits)]
  assert len(gated) == n_gated
  assert all((b.a, b.g, b.w) == ((3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4) for b in gated)
  assert sum(b is None for _, b, _ in record_bits) == n_fp
  depthwise = [b for groups, b, _ in record_bits if groups > 1]
  assert len(depthwise) == n_depthwise and all(b == StaticBits(8, 16, 8) for b in depthwise)


# ------------------------------------------------------------------ running forward passes


@pytest.mark.parametrize("name, size, train, bits", [
    ("resnet20", 16, True, None), ("resnet20", 16, True, (4, 8)),
    ("resnet20", 16, False, None), ("resnet20", 16, False, (4, 8)),
    ("mobilenet_v2", 8, True, (4, 8)), ("resnet18", 32, True, (4, 8)),
])
def test_plain_output_shapes(name, size, train, bits):
  model = models.create(name, num_classes=7, rngs=nnx.Rngs(0))
  if not train:
    model.eval()
  logits = nnx.jit(lambda m, x, k: m(x, bits, key=k))(model, images(2, size), jax.random.key(1))
  chex.assert_shape(logits, (2, 7))
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", ["resnet38", "resnet110", "resnet34", "resnet50"])
def test_big_plain_output_shapes_traced(name):
  model = abstract(name, 1000)
  model.eval()
  out = _trace(model, lambda m, x: m(x), images(1, 32))
  assert out.shape == (1, 1000)


def test_quantized_train_step_needs_a_key():
  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="PRNG key"):
    model(images(2, 8), (4, 8))
  model.eval()
  chex.assert_shape(model(images(2, 8), (4, 8)), (2, 10))  # Evaluation rounds nothing.


def test_full_precision_ignores_the_key():
  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  x = images(2, 8)
  np.testing.assert_array_equal(model(x), model(x, key=jax.random.key(5)))


def _split_stats(model):
  bn = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
        if p[-1] in ("mean", "var")}
  act = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
         if p[-1] in ("act_lo", "act_range")}
  return ({p: np.asarray(v[...]) for p, v in bn.items()},
          {p: np.asarray(v[...]) for p, v in act.items()})


def test_train_updates_running_stats_and_eval_uses_them():
  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  x = images(4, 8)
  bn0, act0 = _split_stats(model)
  model(x, (4, 8), key=jax.random.key(0))
  bn1, act1 = _split_stats(model)
  assert all(not np.array_equal(bn0[p], bn1[p]) for p in bn0)
  assert all(not np.array_equal(act0[p], act1[p]) for p in act0 if p[-1] == "act_range")
  # Running range from zero: m * 0 + (1 - m) * batch value. Only the stem sees negative
  # inputs; every other conv reads a ReLU output, whose minimum is 0.
  stem = {p[-1]: v for p, v in act1.items() if p[0] == "stem"}
  np.testing.assert_allclose(stem["act_lo"], 0.1 * float(x.min()), rtol=1e-6)
  np.testing.assert_allclose(stem["act_range"], 0.1 * float(x.max() - x.min()), rtol=1e-6)
  assert all(v == 0 for p, v in act1.items() if p[0] != "stem" and p[-1] == "act_lo")

  model.eval()
  out = model(x, (4, 8))
  bn2, act2 = _split_stats(model)
  for before, after in ((bn1, bn2), (act1, act2)):
    for p in before:
      np.testing.assert_array_equal(before[p], after[p])
  np.testing.assert_array_equal(out, model(x, (4, 8)))

  # Eval output depends on the running activation range ...
  conv = model.blocks[4].conv1.conv
  saved = conv.act_range[...]
  conv.act_range[...] = saved * 2.0
  assert not np.allclose(out, model(x, (4, 8)))
  conv.act_range[...] = saved
  np.testing.assert_array_equal(out, model(x, (4, 8)))
  # ... and on the BN running statistics.
  bn = model.blocks[4].conv1.bn
  bn.mean[...] = bn.mean[...] + 1.0
  assert not np.allclose(out, model(x, (4, 8)))


def test_train_mode_uses_batch_statistics_not_running_ones():
  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  x = images(4, 8)
  key = jax.random.key(0)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  out = nnx.merge(graphdef, params, stats)(x, (4, 8), key=key)
  shifted = jax.tree.map(lambda v: v + 3.0, stats)
  np.testing.assert_array_equal(out, nnx.merge(graphdef, params, shifted)(x, (4, 8), key=key))


def _grad_fn(model, fn):
  """jit(grad) of ``fn(model, key)`` w.r.t. the model's Params, as a function of the key."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, key):
    return fn(nnx.merge(graphdef, p, rest, copy=True), key)

  grad = jax.jit(jax.grad(loss))
  return lambda key: grad(params, key)


def test_gradient_rounding_depends_on_the_key_and_is_reproducible():
  model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  x = images(4, 8)
  kernel = lambda g: np.asarray(g["blocks"][0]["conv1"]["conv"]["kernel"][...])
  grad = _grad_fn(model, lambda m, k: jnp.sum(m(x, (4, 8), key=k) ** 2))
  g1, g1_again, g2 = (kernel(grad(jax.random.key(i))) for i in (1, 1, 2))
  np.testing.assert_array_equal(g1, g1_again)
  assert not np.allclose(g1, g2)
  # Unquantized gradients (b_g = 0) of the same 4-bit forward: 8-bit rounding stays close.
  exact = kernel(_grad_fn(model, lambda m, k: jnp.sum(m(x, (4, 0)) ** 2))(None))
  for g in (g1, g2):
    assert np.corrcoef(g.ravel(), exact.ravel())[0, 1] > 0.9
    assert not np.allclose(g, exact)
