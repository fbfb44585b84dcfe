"""The Transformer LM: QDense against NumPy, causality, parameter and MAC counts, tiny runs."""

import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from fractrain_jax import cost, models, quant
from fractrain_jax.run import config_check, train
from fractrain_jax.errors import ConfigError
from fractrain_jax.layers import QDense, StaticBits

V, D, T = 11, 16, 8  # Vocabulary, width, context of the tiny models.


def tiny_lm(**options):
  kw = dict(depth=2, width=D, heads=2, mlp_ratio=4, context=T)
  kw.update(options)
  return models.create(models.LM, num_classes=V, rngs=nnx.Rngs(0), **kw)


# ---------------------------------------------------------------- QDense


def np_quantize(x, bits, lo, hi, u=0.0):
  """SPEC section 1 in float32 NumPy, scaling by 1/step as quant.py does (with noise
  added, a division would move an element across a rounding boundary now and then)."""
  x, lo, hi = (np.asarray(v, np.float32) for v in (x, lo, hi))
  levels = np.float32(2.0**bits - 1)
  s = np.maximum((hi - lo) / levels, np.float32(1e-8))
  v = (x - lo) * (np.float32(1) / s) + np.float32(u)
  return (np.clip(np.round(v), 0, levels) * s + lo).astype(np.float32)


def dense_vjp(layer, x, bits, cot, key):
  """Output and (dx, dkernel, dbias) of ``layer(x, bits, key=key)`` in training mode."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def apply(x, params):
    return nnx.merge(graphdef, params, rest, copy=True)(x, bits, key=key)

  y, vjp = jax.vjp(apply, x, params)
  dx, dparams = vjp(cot)
  return y, dx, dparams["kernel"][...], dparams["bias"][...]


@pytest.mark.parametrize("bits", [None, StaticBits(0, 0, 0)])
def test_full_precision_qdense_is_the_plain_layer_bit_for_bit(bits):
  layer = QDense(D, 24, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, T, D))
  cot = jax.random.normal(jax.random.key(2), (3, T, 24))
  w, b = layer.kernel[...], layer.bias[...]
  y, dx, dw, db = dense_vjp(layer, x, bits, cot, jax.random.key(3))
  ref, ref_vjp = jax.vjp(lambda x, w, b: jnp.dot(x, w) + b, x, w, b)
  rdx, rdw, rdb = ref_vjp(cot)
  for got, want in ((y, ref), (dx, rdx), (dw, rdw), (db, rdb)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("a,g,w", [(8, 8, 8), (4, 6, 4), (3, 8, 2)])
def test_quantized_qdense_and_its_gradients_match_numpy(a, g, w):
  layer = QDense(D, 12, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  cot = jax.random.normal(jax.random.key(2), (2, T, 12))
  key = jax.random.key(3)
  y, dx, dw, db = dense_vjp(layer, x, StaticBits(a, g, w), cot, key)
  xn, kn, bn, gn = (np.asarray(v) for v in (x, layer.kernel[...], layer.bias[...], cot))
  xq = np_quantize(xn, a, xn.min(), xn.max())  # Input: one range for the tensor.
  wq = np_quantize(kn, w, kn.min(axis=0), kn.max(axis=0))  # Weights: per output channel.
  u = np.asarray(quant.uniform_noise(key, cot.shape))  # The layer's rounding noise.
  gq = np_quantize(gn, g, gn.min(), gn.max(), u)  # dL/dy, stochastically rounded.
  np.testing.assert_allclose(y, xq @ wq + bn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, np.einsum("bti,bto->io", xq, gq), rtol=1e-4, atol=1e-4)
  # The bias adds after the gradient quantizer: its gradient is the exact sum.
  np.testing.assert_allclose(db, gn.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("options,bits", [
    ({}, None),
    ({"positions": "sinusoidal", "tied": False}, None),
    ({}, (4, 8)),  # Evaluation: the running input ranges, fixed per layer.
])
def test_changing_a_future_token_never_changes_earlier_logits(options, bits):
  model = tiny_lm(**options)
  tokens = jax.random.randint(jax.random.key(0), (2, T), 0, V)
  if bits is not None:  # One training pass sets the running input ranges evaluation uses.
    model(tokens, bits, key=jax.random.key(1))
    assert float(model.blocks[0].fc1.act_range[...]) > 0
  model.eval()
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)
  before, after = model(tokens, bits), model(changed, bits)
  chex.assert_shape(before, (2, T, V))
  np.testing.assert_array_equal(np.asarray(before[:, :5]), np.asarray(after[:, :5]))
  assert not np.allclose(before[:, 5:], after[:, 5:])


def test_dropout_draws_from_the_key_in_training_and_is_off_in_evaluation():
  model = tiny_lm(dropout=0.5)
  tokens = jnp.zeros((1, T), jnp.int32)
  keys = jax.random.key(0), jax.random.key(1)
  a, b, again = model(tokens, key=keys[0]), model(tokens, key=keys[1]), model(tokens, key=keys[0])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
  assert not np.allclose(a, b)
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(tokens, key=keys[0])),
                                np.asarray(model(tokens, key=keys[1])))


@pytest.mark.parametrize("tied,positions", [(True, "learned"), (False, "sinusoidal")])
def test_parameter_count_matches_a_hand_count(tied, positions):
  model = tiny_lm(tied=tied, positions=positions)
  block = (2 * D            # LayerNorm 1: scale, bias.
           + 4 * (D * D + D)  # Q, K, V, output projections with biases.
           + 2 * D            # LayerNorm 2.
           + D * 4 * D + 4 * D + 4 * D * D + D)  # MLP.
  want = (V * D + (T * D if positions == "learned" else 0) + 2 * block + 2 * D
          + (0 if tied else D * V + V))
  got = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert got == want


def test_cost_table_holds_the_real_macs_per_window():
  layers = {l.name: l for l in tiny_lm().layer_macs()}
  for name in ("q", "k", "v", "out"):
    assert (layers[f"blocks.0.attn.{name}"].macs, layers[f"blocks.0.attn.{name}"].kind) == (
        T * D * D, "static")
  assert layers["blocks.1.fc1"].macs == layers["blocks.1.fc2"].macs == T * D * 4 * D
  # Full precision, counted at 32 bits: the attention products and the tied output layer.
  assert (layers["blocks.0.attn.products"].macs, layers["blocks.0.attn.products"].kind) == (
      2 * T * T * D, "fp")
  assert (layers["lm_head"].macs, layers["lm_head"].kind) == (T * D * V, "fp")
  assert len(layers) == 2 * 7 + 1
  quantized = 2 * (4 * T * D * D + 8 * T * D * D)
  full = 2 * 2 * T * T * D + T * D * V
  sbm = cost.static_cost(list(layers.values()), (8, 8))
  assert sbm.total == pytest.approx(3 * quantized * 64 / 1024 + 3 * full)


# ---------------------------------------------------------------- training


def write_corpus(folder: pathlib.Path) -> str:
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
  for split, lines in (("valid", 120), ("test", 30)):
    text = "\n".join(" ".join(rng.choice(words, rng.integers(0, 10))) for _ in range(lines))
    (folder / f"{split}.txt").write_text(text + "\n")
  return f"text:{folder}"


def lm_config(method, dataset, /, **overrides):
  config = default.get_config()
  config.method = method
  config.model.name = models.LM
  config.model.lm.update(depth=1, width=16, heads=2, context=8)
  config.data.update(dataset=dataset, text_train="valid", text_test="test")
  config.train.update(iters=4, batch_size=8, eval_every=2, eval_batch_size=8, log_every=1,
                      num_devices=1)
  config.optim.boundaries = (3,)
  config.pfq.update(fw_schedule=(4, 8), bw_schedule=(8, 8), num_turning_points=1, window=2,
                    scale_epochs=1, eps=10.0)  # eps 10: a turning point once the window fills.
  config.update_from_flattened_dict(overrides)  # Keys such as "model.lm.heads".
  return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("method", ["fp32", "static", "pfq"])
def test_each_method_trains_the_lm_end_to_end(method, corpus, tmp_path):
  iters = 6 if method == "pfq" else 4  # PFQ: a turning point at step 4, then a stage at 8/8.
  summary = train.train_and_evaluate(lm_config(method, corpus, **{"train.iters": iters}),
                                     tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(2, iters + 1, 2))
  for line in lines:
    assert line["test_ppl"] == pytest.approx(math.exp(line["test_loss"]))
    assert 1.0 < line["test_ppl"] < 100.0  # A 10-word vocabulary, not yet learned.
  assert summary["final_test_ppl"] == pytest.approx(lines[-1]["test_ppl"])
  assert summary["best_test_ppl"] == pytest.approx(min(l["test_ppl"] for l in lines))
  assert summary["total_cost"] == pytest.approx(lines[-1]["cost"])
  ratio = summary["total_cost"] / summary["cost_sbm8"]
  if method == "fp32":
    assert summary["total_cost"] == pytest.approx(summary["cost_fp32"])
  elif method == "static":
    assert ratio == pytest.approx(1.0)
  else:  # 4/8 bits, then 8/8 after the turning point at step 4.
    assert summary["turning_points"] == [4]
    assert [l["fw_bits"] for l in lines] == [4, 4, 8]
    # Two thirds of the steps at 4/8 bits: the quantized layers' FW and GC at half.
    assert 0.5 < ratio < 1.0


def test_lm_run_resumes_exactly(corpus, tmp_path):
  config = lm_config("pfq", corpus)
  whole = train.train_and_evaluate(config, tmp_path / "whole")
  assert train.train_and_evaluate(config, tmp_path / "split", stop_at=3) == {"stopped_at": 3}
  resumed = train.train_and_evaluate(config, tmp_path / "split")
  for key in ("final_test_loss", "total_cost", "turning_points"):
    assert resumed[key] == whole[key]


@pytest.mark.parametrize("key,value,match", [
    ("dfq.forward", "per_candidate", "transformer_lm chooses per token and runs 'single'"),
    ("data.dataset", "cifar10", "transformer_lm trains on a word-level corpus"),
    ("model.lm.heads", 3, "expected a divisor of config.model.lm.width=16"),
    ("model.lm.positions", "rotary", "model.lm.positions='rotary'"),
    ("data.text_test", "valid", "is the training split too"),
])
def test_bad_lm_configs_are_refused_early(key, value, match):
  with pytest.raises(ConfigError, match=match):
    config_check.validate(lm_config("dfq", "text:/data", **{key: value}))


def test_a_text_dataset_needs_the_lm():
  with pytest.raises(ConfigError, match="expected 'transformer_lm'"):
    config_check.validate(lm_config("fp32", "text:/data", **{"model.name": "resnet20"}))


def test_report_shows_perplexity_for_lm_runs(tmp_path):
  from fractrain_jax import report  # pylint: disable=import-outside-toplevel

  for name, ppl in (("sbm", 300.0), ("pfq", 320.0)):
    workdir = tmp_path / name
    workdir.mkdir()
    line = {"step": 10, "test_loss": math.log(ppl), "test_acc": 9.0, "test_ppl": ppl,
            "cost": 1e9, "method": "static" if name == "sbm" else "pfq", "stage": 0,
            "model": models.LM, "model_cp": 50.0}
    (workdir / "metrics.jsonl").write_text(json.dumps(line) + "\n")
  runs = [report.load_run(tmp_path / n) for n in ("sbm", "pfq")]
  table = report.markdown_table(runs)
  assert "final test ppl" in table and "final acc" not in table
  assert "| 300.00 | 300.00 |" in table and "| 320.00 | 320.00 |" in table
  assert [p.name for p in report.plot_all(runs, tmp_path / "out")][0] == "ppl_vs_cost.png"
