"""Cost accounting of SPEC section 2 against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractrain_jax import cost
from fractrain_jax.cost import LayerMACs


def test_8_8_step_costs_one_sixteenth_of_fp32():
  layers = [LayerMACs("a", 1000), LayerMACs("b", 5000)]
  c8 = cost.static_cost(layers, (8, 8))
  c32 = cost.fp32_cost(layers)
  assert c8.total == pytest.approx(c32.total / 16)
  assert cost.cp(c8, layers) == pytest.approx(100 / 16)
  assert cost.cp(c32, layers) == pytest.approx(100.0)


def test_two_layer_cp_by_hand():
  # Layer 1: quantized at a=4, g=6, weights at a; layer 2: full precision.
  layers = [LayerMACs("conv", 100), LayerMACs("fc", 50, kind="fp")]
  c = cost.static_cost(layers, (4, 6))
  fw = 100 * 4 * 4 / 1024 + 50
  eb = 100 * 6 * 4 / 1024 + 50
  gc = 100 * 4 * 6 / 1024 + 50
  assert (c.fw, c.eb, c.gc) == pytest.approx((fw, eb, gc))
  assert cost.cp(c, layers) == pytest.approx((fw + eb + gc) / (3 * 150) * 100)


def test_fixed_layers_keep_their_width():
  layers = [LayerMACs("dw", 64, kind="fixed", fixed=(8, 16, 8)), LayerMACs("pw", 64)]
  c = cost.static_cost(layers, (4, 4))
  assert c.fw == pytest.approx(64 * 64 / 1024 + 64 * 16 / 1024)
  assert c.eb == pytest.approx(64 * 128 / 1024 + 64 * 16 / 1024)
  assert c.gc == pytest.approx(64 * 128 / 1024 + 64 * 16 / 1024)


def test_gated_cost_per_sample_and_its_gradient():
  layers = [LayerMACs("stem", 10, kind="fp"),
            LayerMACs("b0c1", 100, kind="gated", block=0),
            LayerMACs("b0c2", 100, kind="gated", block=0),
            LayerMACs("b1c1", 40, kind="gated", block=1)]
  a, g, w = (3, 4, 6), (6, 8, 12), 4
  choice = np.array([[0, 2], [1, 1]])  # (blocks, batch)
  masks = jax.nn.one_hot(choice, 3)
  c = cost.gated_cost(layers, masks, a, g, w)
  for n in range(2):
    k0, k1 = choice[0, n], choice[1, n]
    want = [10.0, 10.0, 10.0]
    for macs, k in ((200, k0), (40, k1)):
      want[0] += macs * a[k] * w / 1024
      want[1] += macs * g[k] * w / 1024
      want[2] += macs * a[k] * g[k] / 1024
    np.testing.assert_allclose([c.fw[n], c.eb[n], c.gc[n]], want, rtol=1e-6)
  # d total / d mask[l, n, k] is that block's cost at candidate k: the gate's cost signal.
  grad = jax.grad(lambda m: cost.gated_cost(layers, m, a, g, w).total.sum())(masks)
  unit = np.array([(ak * w + gk * w + ak * gk) / 1024 for ak, gk in zip(a, g)])
  np.testing.assert_allclose(grad[0, 0], 200 * unit, rtol=1e-6)
  np.testing.assert_allclose(grad[1, 1], 40 * unit, rtol=1e-6)


def test_width_zero_counts_as_full_precision():
  layers = [LayerMACs("conv", 100)]
  assert cost.static_cost(layers, (0, 0)).total == pytest.approx(300)


GATED_LAYERS = [LayerMACs("stem", 10, kind="fp"),
                LayerMACs("b0c1", 100, kind="gated", block=0),
                LayerMACs("b0c2", 300, kind="gated", block=0),
                LayerMACs("b0sc", 20, kind="fp"),
                LayerMACs("b1c1", 40, kind="gated", block=1),
                LayerMACs("b2c1", 60, kind="gated", block=2),
                LayerMACs("fc", 5, kind="fp")]


def authors_cost(choice, weights, a, g, w):
  """train_frac.py's cost term and cp, by loops: sum over batch and blocks / mean(w)."""
  num_blocks, batch = choice.shape
  unit = lambda k: (a[k] * w + g[k] * w + a[k] * g[k]) / 32**2
  total = sum(weights[l] * unit(choice[l, n]) for l in range(num_blocks) for n in range(batch))
  cp = sum(weights[l] * unit(choice[l, n]) / batch
           for l in range(num_blocks) for n in range(batch)) / (3 * sum(weights)) * 100
  return total / np.mean(weights), cp


def test_block_weights_count_gated_blocks_only():
  assert cost.block_weights(GATED_LAYERS, "blocks") == [1.0, 1.0, 1.0]
  assert cost.block_weights(GATED_LAYERS, "macs") == [400.0, 40.0, 60.0]
  with pytest.raises(ValueError, match="flops"):
    cost.block_weights(GATED_LAYERS, "flops")
  with pytest.raises(ValueError, match="no gated layers"):
    cost.block_weights([LayerMACs("c", 5)], "blocks")


@pytest.mark.parametrize("weighting", ["blocks", "macs"])
@pytest.mark.parametrize("a,g,w", [((3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4),
                                   ((3, 4, 6, 8), (6, 8, 12, 16), 6)])
def test_steering_cost_and_cp_are_the_authors_formula(weighting, a, g, w):
  rng = np.random.default_rng(0)
  choice = rng.integers(0, len(a), (3, 5))  # 3 blocks, batch 5, several candidates.
  masks = jax.nn.one_hot(choice, len(a))
  weights = cost.block_weights(GATED_LAYERS, weighting)
  want_total, want_cp = authors_cost(choice, weights, a, g, w)
  got_total = cost.steer_cost_sum(masks, weights, a, g, w)
  np.testing.assert_allclose(got_total, want_total, rtol=1e-6)
  np.testing.assert_allclose(cost.steer_cp(masks, weights, a, g, w), want_cp, rtol=1e-6)
  # d total / d mask[l, n, k]: block l's weight over the mean weight, times candidate k's cost.
  grad = jax.grad(lambda m: cost.steer_cost_sum(m, weights, a, g, w))(masks)
  unit = np.array([(ak * w + gk * w + ak * gk) / 1024 for ak, gk in zip(a, g)])
  for l in range(3):
    np.testing.assert_allclose(grad[l, 2], weights[l] / np.mean(weights) * unit, rtol=1e-6)


def test_steering_cp_leaves_full_precision_layers_out():
  # Every block at 8/8 with 8-bit weights: exactly 1/16 whatever the fp layers.
  masks = jax.nn.one_hot(jnp.full((3, 4), 1), 2)
  for weighting in ("blocks", "macs"):
    weights = cost.block_weights(GATED_LAYERS, weighting)
    assert float(cost.steer_cp(masks, weights, (4, 8), (4, 8), 8)) == pytest.approx(100 / 16)
  # The whole-model cp of the same step counts the fp layers at 32 bits.
  whole = cost.cp(cost.gated_cost(GATED_LAYERS, masks, (4, 8), (4, 8), 8), GATED_LAYERS)
  assert float(whole[0]) == pytest.approx((500 / 16 + 35) / 535 * 100)


def test_bad_layer_descriptions_are_refused():
  with pytest.raises(ValueError, match="kind='int8'"):
    LayerMACs("x", 1, kind="int8")
  with pytest.raises(ValueError, match="fixed"):
    LayerMACs("x", 1, kind="fixed")
