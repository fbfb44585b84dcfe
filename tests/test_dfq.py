"""DFQ's sign rules, cost loss, target and temperature schedules, and gates (SPEC sections 4, 5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractrain_jax import dfq

F32 = np.float32


def below(x):
  """The float32 just below x."""
  return np.nextafter(F32(x), F32(-np.inf))


def above(x):
  return np.nextafter(F32(x), F32(np.inf))


def frac_rule(cp, target, range_):
  """SPEC section 4, FracTrain script, written out."""
  if cp < target:
    return -1.0
  if cp >= target + range_:
    return 1.0
  return 0.0


def dfq_rule(cp, target, relax):
  """SPEC section 4, DFQ script, written out."""
  if cp < target - relax:
    return -1.0
  if cp >= target + relax:
    return 1.0
  return -0.1 if cp < target else 0.1


# All targets and band edges are exact in float32: 2.0, 2.5, 3.0.
TARGET = 2.5
CPS = [0.0, 1.9, below(2.0), F32(2.0), above(2.0), below(2.5), F32(2.5),
       above(2.5), below(3.0), F32(3.0), above(3.0), 50.0]


@pytest.mark.parametrize("range_", [0.0, 0.5])
def test_frac_sign_at_and_around_the_edges(range_):
  got = [float(dfq.cost_sign(cp, TARGET, rule="frac", range_=range_)) for cp in CPS]
  assert got == [frac_rule(F32(cp), F32(TARGET), F32(range_)) for cp in CPS]
  # The edges themselves, spelled out: at the target the sign is +1 without
  # a band and 0 inside one; at target + range it is +1.
  assert float(dfq.cost_sign(2.5, 2.5, rule="frac", range_=range_)) == (
      1.0 if range_ == 0 else 0.0)
  assert float(dfq.cost_sign(below(2.5), 2.5, rule="frac", range_=range_)) == -1.0
  assert float(dfq.cost_sign(2.5 + range_, 2.5, rule="frac", range_=range_)) == 1.0


@pytest.mark.parametrize("relax", [0.0, 0.5])
def test_dfq_sign_at_and_around_the_edges(relax):
  got = [float(dfq.cost_sign(cp, TARGET, rule="dfq", relax=relax)) for cp in CPS]
  want = [dfq_rule(F32(cp), F32(TARGET), F32(relax)) for cp in CPS]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dfq_band_values():
  # relax 0.5 around 2.5: band edges 2.0 and 3.0.
  sign = lambda cp: float(dfq.cost_sign(cp, 2.5, rule="dfq", relax=0.5))
  assert sign(below(2.0)) == -1.0
  assert sign(2.0) == pytest.approx(-0.1)
  assert sign(below(2.5)) == pytest.approx(-0.1)
  assert sign(2.5) == pytest.approx(0.1)
  assert sign(below(3.0)) == pytest.approx(0.1)
  assert sign(3.0) == 1.0


def test_sign_is_jittable_with_traced_cp_and_target():
  sign = jax.jit(jax.vmap(
      lambda cp, t: dfq.cost_sign(cp, t, rule="dfq", relax=0.5), in_axes=(0, None)))
  cps = np.asarray(CPS, np.float32)
  got = sign(cps, jnp.float32(TARGET))
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, [dfq_rule(c, F32(TARGET), F32(0.5)) for c in cps],
                             rtol=1e-6)
  chex.assert_shape(dfq.cost_sign(1.0, 2.0, rule="frac"), ())


@pytest.mark.parametrize("kwargs,name", [
    (dict(rule="both"), "rule"),
    (dict(rule="dfq", relax=-0.1), "relax"),
    (dict(rule="frac", range_=-0.1), "range_"),
])
def test_sign_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    dfq.cost_sign(1.0, 2.0, **kwargs)


@pytest.mark.parametrize("cp,sign", [(1.0, -1.0), (2.0, 1.0), (5.0, 1.0)])
def test_cost_loss_value_and_gradient(cp, sign):
  beta, cost = 1e-3, 37.5

  def loss(cost, cp):
    return dfq.cost_loss(cost, cp, 2.0, beta=beta, rule="frac")

  value, (d_cost, d_cp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      jnp.float32(cost), jnp.float32(cp))
  np.testing.assert_allclose(value, sign * beta * cost, rtol=1e-6)
  np.testing.assert_allclose(d_cost, sign * beta, rtol=1e-6)
  # The sign is a constant: no gradient reaches cp.
  assert float(d_cp) == 0.0


def test_cost_loss_refuses_negative_beta():
  with pytest.raises(ValueError, match="beta"):
    dfq.cost_loss(1.0, 1.0, 2.0, beta=-1e-3, rule="frac")


def test_frac_target():
  assert [dfq.frac_target(i, 1.5, 0.5) for i in range(4)] == [1.5, 2.0, 2.5, 3.0]
  traced = jax.jit(lambda s: dfq.frac_target(s, 3.0, 0.5))(jnp.int32(3))
  assert float(traced) == 4.5
  with pytest.raises(ValueError, match="stage"):
    dfq.frac_target(-1, 1.5, 0.5)


def test_gumbel_tau_schedule():
  tau = lambda step: float(dfq.gumbel_tau(step, 1000, 5.0, 0.5))
  assert tau(0) == pytest.approx(5.0, rel=1e-6)
  assert tau(1000) == pytest.approx(0.5, rel=1e-6)
  # Exponential: halfway is the geometric mean; a quarter is 5 * 0.1**0.25.
  assert tau(500) == pytest.approx(np.sqrt(5.0 * 0.5), rel=1e-6)
  assert tau(250) == pytest.approx(5.0 * 0.1**0.25, rel=1e-6)
  # Held outside the run.
  assert tau(-10) == pytest.approx(5.0, rel=1e-6)
  assert tau(5000) == pytest.approx(0.5, rel=1e-6)
  jitted = jax.jit(lambda s: dfq.gumbel_tau(s, 1000, 5.0, 0.5))
  assert float(jitted(jnp.int32(500))) == pytest.approx(np.sqrt(2.5), rel=1e-6)
  assert float(dfq.gumbel_tau(300, 1000, 1.0, 1.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("args,name", [
    ((0, 0, 1.0, 0.5), "total_iters"),
    ((0, 10, 0.0, 0.5), "tau_start"),
    ((0, 10, 1.0, -0.5), "tau_end"),
])
def test_gumbel_tau_bad_arguments(args, name):
  with pytest.raises(ValueError, match=name):
    dfq.gumbel_tau(*args)
