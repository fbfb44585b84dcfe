"""DFQ and FracTrain on the Transformer LM: per-token widths, the causal gate, cost, steering.

Numerics are checked against NumPy; the gated LM against the plain LM it
wraps; steering on short runs over the real WikiText-2 text shipped in
../shared (skipped where it is absent).
"""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dfq_wikitext103, frac_wikitext103
from fractrain_jax import cost, dfq, models, quant
from fractrain_jax.run import config_check, train
from fractrain_jax.errors import ConfigError
from fractrain_jax.layers import GatedBits, QDense, StaticBits
from test_lm import dense_vjp, lm_config, np_quantize, write_corpus

V, D, T = 11, 16, 8  # Vocabulary, width, context of the tiny models.
A, G, W = (4, 6, 8), (6, 8, 8), 8  # The LM recipes' candidates.
WIKITEXT_TAR = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                / "wikitext-2-valid-test.tar.gz")


def gated_and_plain(**gate_options):
  """gated_transformer_lm and a plain transformer_lm holding the same LM weights."""
  kw = dict(depth=2, width=D, heads=2, context=T)
  gated = models.create("gated_transformer_lm", num_classes=V, rngs=nnx.Rngs(1), **kw,
                        **gate_options)
  plain = models.create("transformer_lm", num_classes=V, rngs=nnx.Rngs(2), **kw)
  nnx.update(plain, nnx.state(gated.lm))
  return gated, plain


def tokens(batch: int = 3, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, T), 0, V)


# ------------------------------------------------------------ per-token widths


def test_per_token_widths_equal_rows_quantized_one_by_one():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 7)))
  bits = np.asarray([[2, 3, 4, 8, 0], [5, 2, 2, 6, 3]], np.int32)
  got = np.asarray(quant.quantize(jnp.asarray(x), jnp.asarray(bits), lo=x.min(), hi=x.max()))
  for b in range(2):
    for t in range(5):
      # One range for the whole tensor; each row rounds on its own width's grid.
      want = x[b, t] if bits[b, t] == 0 else np_quantize(x[b, t], bits[b, t], x.min(), x.max())
      np.testing.assert_array_equal(got[b, t], want, err_msg=f"row {(b, t)}")


def test_per_token_mask_gradient_is_each_rows_product_with_its_candidate():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 6)))
  g = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 6)))
  mask = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (2, 4), 0, 3), 3)
  lo, hi = x.min(), x.max()
  out, vjp = jax.vjp(lambda x, m: quant.fake_quant_blend(x, m, A, lo=lo, hi=hi, one_hot=True),
                     jnp.asarray(x), mask)
  dx, dmask = vjp(jnp.asarray(g))
  chosen = np.asarray(A)[np.asarray(mask).argmax(-1)]
  for b in range(2):
    for t in range(4):
      np.testing.assert_array_equal(out[b, t], np_quantize(x[b, t], chosen[b, t], lo, hi))
      for k, width in enumerate(A):
        want = np.dot(g[b, t], np_quantize(x[b, t], width, lo, hi))
        np.testing.assert_allclose(dmask[b, t, k], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(dx, g)  # Straight-through: the mask sums to 1 per token.


def test_widths_must_cover_the_leading_axes():
  x = jnp.zeros((2, 5, 7))
  with pytest.raises(ValueError, match="leading axes"):
    quant.quantize(x, jnp.zeros((5,), jnp.int32), lo=0.0, hi=1.0)
  with pytest.raises(ValueError, match="leading axes"):
    quant.fake_quant_blend(x, jnp.zeros((2, 4, 3)), (4, 6, 8), lo=0.0, hi=1.0)


def test_matmul_with_a_width_per_token_matches_numpy_row_by_row():
  """A QDense whose rows carry different (fw, bw): forward and gradients against NumPy."""
  b, t, k = 2, 6, 3
  layer = QDense(D, 12, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (b, t, D)))
  cot = np.asarray(jax.random.normal(jax.random.key(2), (b, t, 12)))
  choice = np.asarray(jax.random.randint(jax.random.key(3), (b, t), 0, k))
  mask = jax.nn.one_hot(choice, k)
  key = jax.random.key(4)
  y, dx, dw, _ = dense_vjp(layer, jnp.asarray(x), GatedBits(mask, A, G, W), jnp.asarray(cot),
                          key)
  kn = np.asarray(layer.kernel[...])
  wq = np_quantize(kn, W, kn.min(axis=0), kn.max(axis=0))
  u = np.asarray(quant.uniform_noise(key, cot.shape))
  xq, gq = np.empty_like(x), np.empty_like(cot)
  for i in range(b):
    for j in range(t):  # Stack the rows, each quantized alone at its token's widths.
      a_w, g_w = A[choice[i, j]], G[choice[i, j]]
      xq[i, j] = np_quantize(x[i, j], a_w, x.min(), x.max())
      gq[i, j] = np_quantize(cot[i, j], g_w, cot.min(), cot.max(), u[i, j])
      # The gradient row lies on its own width's grid within the tensor's range.
      step = (cot.max() - cot.min()) / (2.0**g_w - 1)
      levels = (gq[i, j] - cot.min()) / step
      np.testing.assert_allclose(levels, np.round(levels), atol=2e-3)
  np.testing.assert_allclose(y, xq @ wq + np.asarray(layer.bias[...]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, np.einsum("bti,bto->io", xq, gq), rtol=1e-4, atol=1e-4)
  # The rows at 4 bits really differ from the same rows at 8: the widths reached the rows.
  assert len(np.unique(choice)) == k


# ------------------------------------------------------------ the gated LM


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("k", range(3))
def test_forced_gate_equals_static_lm_bit_for_bit(train_mode, k):
  gated, plain = gated_and_plain()
  x = tokens()
  key = jax.random.key(7)
  if not train_mode:  # Running ranges from one training pass, then evaluation.
    gated(x, key=key, force=k)
    plain.forward(x, [StaticBits(A[k], G[k], W)] * 4, key=jax.random.split(key)[1])
    gated.eval()
    plain.eval()
  logits, masks = gated(x, key=key, force=k)
  chex.assert_shape(masks, (4, 3, T, 3))
  np.testing.assert_array_equal(masks, np.broadcast_to(np.eye(3)[k], masks.shape))
  want = plain.forward(x, [StaticBits(A[k], G[k], W)] * 4, key=jax.random.split(key)[1])
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(gated.lm, nnx.BatchStat)),
                               nnx.to_flat_state(nnx.state(plain, nnx.BatchStat))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def param_grads(model, fn):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return jax.grad(lambda p: fn(nnx.merge(graphdef, p, rest, copy=True)))(params)


@pytest.mark.parametrize("k", [0, 2])
def test_forced_gate_gradients_equal_static_lm_bit_for_bit(k):
  gated, plain = gated_and_plain()
  x, y = tokens(), tokens(seed=1)
  key = jax.random.key(8)
  ce = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None],
                                                    axis=-1))
  g_gated = param_grads(gated, lambda m: ce(m(x, key=key, force=k)[0]))
  g_plain = param_grads(plain, lambda m: ce(m.forward(
      x, [StaticBits(A[k], G[k], W)] * 4, key=jax.random.split(key)[1])))
  flat_plain = dict(nnx.to_flat_state(g_plain))
  flat_gated = nnx.to_flat_state(g_gated["lm"])
  assert len(flat_gated) == len(flat_plain)
  for path, v in flat_gated:
    np.testing.assert_array_equal(v[...], flat_plain[path][...], err_msg=str(path))
  assert all(not np.any(v[...]) for _, v in nnx.to_flat_state(g_gated["gate"]))


def test_full_precision_equals_the_plain_fp32_lm():
  gated, plain = gated_and_plain()
  x = tokens()
  logits, masks = gated(x, key=jax.random.key(3), full_precision=True)
  np.testing.assert_allclose(logits, plain(x), rtol=1e-6, atol=1e-6)
  chex.assert_shape(masks, (4, 3, T, 3))


def test_gate_decides_per_token_and_gets_gradients_from_loss_and_cost():
  gated, _ = gated_and_plain()
  x = tokens(4)
  key = jax.random.key(5)
  _, masks = gated(x, key=key)
  masks = np.asarray(masks)
  assert set(np.unique(masks)) <= {0.0, 1.0}
  np.testing.assert_array_equal(masks.sum(-1), 1.0)
  # Different tokens of one sequence take different candidates.
  assert any(len(np.unique(masks[s, b].argmax(-1))) > 1 for s in range(4) for b in range(4))
  units = cost.candidate_units(A, G, W)

  def task(m):
    logits, _ = m(x, key=key)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  def cost_term(m):
    return jnp.sum(m(x, key=key)[1] * units)

  for fn in (task, cost_term):
    grads = nnx.to_flat_state(param_grads(gated, fn)["gate"])
    for path, g in grads:
      assert np.all(np.isfinite(g[...])), path
      assert np.any(g[...] != 0), f"{fn.__name__}: no gradient reaches {path}"


def _changed_after(x, t):
  return x.at[:, t + 1:].set((x[:, t + 1:] + 1) % V)


@pytest.mark.parametrize("t", [0, 3, 6])
def test_eval_is_causal_logits_and_gate_choices(t):
  gated, _ = gated_and_plain()
  x = tokens()
  gated(x, key=jax.random.key(0))  # Running ranges for evaluation.
  gated.eval()
  before, masks_before = gated(x)
  after, masks_after = gated(_changed_after(x, t))
  np.testing.assert_array_equal(np.asarray(before[:, :t + 1]), np.asarray(after[:, :t + 1]))
  np.testing.assert_array_equal(np.asarray(masks_before[:, :, :t + 1]),
                                np.asarray(masks_after[:, :, :t + 1]))
  assert not np.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("sampler", ["gumbel", "hard"])
def test_training_gate_is_causal_with_the_ranges_held(sampler):
  """Training-mode gate (Gumbel noise or the authors' argmax), per-tensor ranges held fixed."""
  gated, _ = gated_and_plain(gate=sampler)
  x = tokens()
  key = jax.random.key(1)
  gated(x, key=key)
  held = nnx.view(gated, use_running_average=True, raise_if_not_found=False)
  assert not held.gate.deterministic  # The gate samples as in training.
  t = 4
  before, masks_before = held(x, key=key)
  after, masks_after = held(_changed_after(x, t), key=key)
  np.testing.assert_array_equal(np.asarray(before[:, :t + 1]), np.asarray(after[:, :t + 1]))
  np.testing.assert_array_equal(np.asarray(masks_before[:, :, :t + 1]),
                                np.asarray(masks_after[:, :, :t + 1]))
  assert not np.array_equal(np.asarray(masks_before[:, :, t + 1:]),
                            np.asarray(masks_after[:, :, t + 1:]))

  # The logits' dependence: no gradient from position <= t reaches a later token's embedding.
  graphdef, params, rest = nnx.split(held, nnx.Param, ...)

  def early_logits(p):
    return jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x, key=key)[0][:, :t + 1] ** 2)

  d_embed = np.asarray(jax.grad(early_logits)(params)["lm"]["positions"]["embedding"][...])
  assert not np.any(d_embed[t + 1:]) and np.any(d_embed[:t + 1])


# ------------------------------------------------------------ cost and steering


def test_cost_table_charges_each_matmul_to_its_sublayer():
  gated, _ = gated_and_plain()
  layers = {l.name: l for l in gated.layer_macs()}
  for l in (0, 1):
    for name in ("q", "k", "v", "out"):
      assert (layers[f"blocks.{l}.attn.{name}"].kind, layers[f"blocks.{l}.attn.{name}"].block
              ) == ("gated", 2 * l)
    for name in ("fc1", "fc2"):
      assert (layers[f"blocks.{l}.{name}"].kind, layers[f"blocks.{l}.{name}"].block) == (
          "gated", 2 * l + 1)
    assert layers[f"blocks.{l}.attn.products"].kind == "fp"
  assert layers["lm_head"].kind == "fp"
  assert cost.block_weights(list(layers.values()), "macs") == [4 * T * D * D, 8 * T * D * D] * 2


@pytest.mark.parametrize("weighting", ["blocks", "macs"])
def test_cost_term_equals_a_hand_computation_for_fixed_masks(weighting):
  gated, _ = gated_and_plain()
  layers = gated.layer_macs()
  num_blocks, batch, k = 4, 3, 3
  choice = np.asarray(jax.random.randint(jax.random.key(0), (num_blocks, batch, T), 0, k))
  masks = jax.nn.one_hot(choice, k)
  w = np.asarray(cost.block_weights(layers, weighting), np.float64)
  unit = [(a * W + g * W + a * g) / 1024 for a, g in zip(A, G)]  # FW + EB + GC per MAC.
  # Per sequence: the mean over its tokens of the authors' block sum; summed over the batch.
  per_sequence = [np.mean([sum(w[l] * unit[choice[l, b, t]] for l in range(num_blocks))
                           / w.mean() for t in range(T)]) for b in range(batch)]
  want_sum = sum(per_sequence)
  want_cp = np.mean([sum(w[l] * unit[choice[l, b, t]] for l in range(num_blocks))
                     / (3 * w.sum()) * 100 for b in range(batch) for t in range(T)])
  got_sum = float(cost.steer_cost_sum(masks, w, A, G, W))
  got_cp = float(cost.steer_cp(masks, w, A, G, W))
  assert got_sum == pytest.approx(want_sum, rel=1e-5)
  assert got_cp == pytest.approx(want_cp, rel=1e-5)
  # The loss term: below the target the sign is -1, above it +1 (FracTrain's rule).
  for target, sign in ((want_cp + 1.0, -1.0), (want_cp - 1.0, 1.0)):
    term = dfq.cost_loss(got_sum, got_cp, target, beta=1e-3, rule="frac")
    assert float(term) == pytest.approx(sign * 1e-3 * want_sum, rel=1e-5)
  # Whole-model cost per sequence: each gated layer at its tokens' mean choice, the rest FP32.
  fixed = sum(3 * l.macs for l in layers if l.kind == "fp")
  whole = cost.gated_cost(layers, masks, A, G, W).total
  for b in range(batch):
    want = fixed + sum(l.macs * np.mean([unit[choice[l.block, b, t]] for t in range(T)])
                       for l in layers if l.kind == "gated")
    assert float(whole[b]) == pytest.approx(want, rel=1e-5)


def test_gated_lm_parameter_count_matches_a_hand_count():
  gated, plain = gated_and_plain()
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  head = D * 32 + 32 + 32 * 16 + 16  # Two dense layers of the "lm" layout, per sublayer.
  lstm = 4 * (16 * 16) + 4 * (16 * 16 + 16)  # nnx.LSTMCell: input and recurrent kernels, one bias.
  project = 16 * 3 + 3
  assert count(gated.gate) == 4 * head + lstm + project
  assert count(gated) == count(plain) + count(gated.gate)


# ------------------------------------------------------------ configs and runs


def lm_run_config(recipe, dataset, **overrides):
  config = recipe.get_config()
  config.model.lm.update(depth=1, width=32, heads=2, context=16, dropout=0.0)
  config.data.update(dataset=dataset, text_train="valid", text_test="test",
                     train_subset=20000, test_subset=1024)
  config.train.update(batch_size=16, eval_every=20, eval_batch_size=32, num_devices=1)
  config.optim.update(lr=3e-3, warmup_iters=5, warmup_lr=3e-4, weight_decay=0.0)
  config.pfq.update(window=3, scale_epochs=2)
  config.update_from_flattened_dict(overrides)
  return config


def test_per_candidate_forward_is_refused_for_the_lm():
  config = lm_run_config(dfq_wikitext103, "text:/data", **{"dfq.forward": "per_candidate"})
  with pytest.raises(ConfigError, match="runs 'single' only"):
    config_check.validate(config)
  with pytest.raises(ValueError, match="runs 'single' only"):
    models.create("gated_transformer_lm", num_classes=V, rngs=nnx.Rngs(0),
                  forward="per_candidate")


@pytest.fixture(scope="module")
def wikitext2(tmp_path_factory):
  import tarfile  # pylint: disable=import-outside-toplevel

  if not WIKITEXT_TAR.is_file():
    pytest.skip(f"real WikiText-2 not found at {WIKITEXT_TAR}")
  root = tmp_path_factory.mktemp("wikitext")
  with tarfile.open(WIKITEXT_TAR, "r:gz") as tar:
    tar.extractall(root, filter="data")
  return f"text:{root / 'wikitext-2'}"


def run_lines(config, workdir):
  train.train_and_evaluate(config, workdir)
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


FLOOR, CEILING = cost.steer_cp_range(A, G, W)


@pytest.mark.parametrize("target", [4.0, 6.0])
@pytest.mark.usefixtures("optimized_compiles")
def test_dfq_on_wikitext2_ends_near_its_target(wikitext2, tmp_path, target):
  # The gate starts near the candidates' mean, about 4.95: 4.0 (inside) asks it down,
  # 6.0 (near the 6.25 top) up.
  config = lm_run_config(dfq_wikitext103, wikitext2, **{"dfq.target_cp": target,
                                                         "train.iters": 160})
  lines = run_lines(config, tmp_path)
  cps = [l["steer_cp"] for l in lines]
  assert abs(cps[0] - target) > 0.5, cps  # It had to travel...
  assert abs(cps[-1] - target) <= 0.3, cps  # ...and got there.
  assert FLOOR <= cps[-1] <= CEILING
  ratios = np.asarray(lines[-1]["choice_ratio"])
  chex.assert_shape(ratios, (2, 3))  # Attention and MLP sublayer of the one block.


@pytest.mark.usefixtures("optimized_compiles")
def test_dfq_and_fractrain_differ_with_the_same_seed(wikitext2, tmp_path):
  runs = {name: run_lines(lm_run_config(recipe, wikitext2, **{"train.iters": 60}),
                          tmp_path / name)
          for name, recipe in (("dfq", dfq_wikitext103), ("frac", frac_wikitext103))}
  assert [l["target_cp"] for l in runs["dfq"]] == [4.8] * 3
  assert runs["frac"][0]["target_cp"] == 3.6
  assert [l["train_loss"] for l in runs["dfq"]] != [l["train_loss"] for l in runs["frac"]]
  assert runs["frac"][-1]["steer_cp"] < runs["dfq"][-1]["steer_cp"]


@pytest.mark.parametrize("method", ["dfq", "frac"])
def test_gated_lm_run_resumes_exactly_and_reports_its_sublayers(method, tmp_path):
  from fractrain_jax import report  # pylint: disable=import-outside-toplevel

  corpus = write_corpus(tmp_path)
  config = lm_config(method, corpus, **{"train.iters": 6, "dfq.fw_candidates": A,
                                        "dfq.bw_candidates": G, "dfq.weight_bits": W,
                                        "dfq.target_cp": 4.8, "dfq.target_step": 0.6})
  whole = train.train_and_evaluate(config, tmp_path / "whole")
  assert train.train_and_evaluate(config, tmp_path / "split", stop_at=3) == {"stopped_at": 3}
  resumed = train.train_and_evaluate(config, tmp_path / "split")
  for key in ("final_test_loss", "total_cost", "cost_quantized", "mean_steer_cp",
              "turning_points"):
    assert resumed[key] == whole[key], key
  # Every quantized layer is gated here: its 8/8 reference is SBM's quantized layers.
  assert whole["cost_quantized"] < whole["cost_quantized_sbm8"]
  assert whole["cost_quantized_sbm8"] < whole["cost_sbm8"] < whole["cost_fp32"]
  run = report.load_run(tmp_path / "whole")
  table = report.markdown_table([run])
  ratio = 100 * whole["cost_quantized"] / whole["cost_quantized_sbm8"]
  assert f"| {report.sci(whole['cost_quantized'])} | {ratio:.3g}% |" in table
  mix = report.choice_table(run, "whole")
  assert "| 0.attention |" in mix and "| 0.MLP |" in mix and "4/6 bits" in mix
  shares = report.choice_shares(run)
  np.testing.assert_allclose(np.sum(shares, axis=1), 1.0, rtol=1e-6)
