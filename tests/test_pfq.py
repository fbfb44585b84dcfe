"""The turning-point indicator against loss sequences worked out by hand (SPEC section 3)."""

import json

import pytest

from fractrain_jax.pfq import TurningPointIndicator

# Epochs 1-10 fall steeply, so the scale (mean of the first 10 epoch losses)
# ends at 15.0 / 10 = 1.5; every later d_i is |L_i - L_last| / 1.5.
DESCENT = [4.0, 3.0, 2.0, 1.5, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
PLATEAUS = [
    0.50,  # e11 window 0.8 .. 0.5: d = 0.3/1.5
    0.50,  # e12 window 0.7 .. 0.5: d = 0.2/1.5
    0.50,  # e13 window 0.6, 0.5, 0.5, 0.5, 0.5: d = 0.1/1.5 = 0.067 > 0.05
    0.42,  # e14 window 0.5 x4, 0.42: d = 0.08/1.5 = 0.053 > 0.05
    0.47,  # e15 window .5 .5 .5 .42 .47: d <= 0.05/1.5 = 0.033: TURNING POINT 1
    # The window restarts empty; eps is now 0.05 * 0.3 = 0.015.
    0.47, 0.46, 0.45, 0.44,  # e16-e19: window not yet full
    0.44,  # e20 window .47 .46 .45 .44 .44: d = 0.03/1.5 = 0.02 > 0.015
    0.44,  # e21 window .46 .45 .44 .44 .44: d = 0.02/1.5 = 0.013: TURNING POINT 2
    # eps is now 0.015 * 0.3 = 0.0045.
    0.44, 0.44, 0.44, 0.44,  # e22-e25
    0.43,  # e26 window .44 x4, .43: d = 0.01/1.5 = 0.0067 > 0.0045
    0.435,  # e27 window .44 .44 .44 .43 .435: d = 0.005/1.5 = 0.0033: TURNING POINT 3
    # No decay after the third; and no fourth turning point, whatever follows.
] + [0.435] * 12
LOSSES = DESCENT + PLATEAUS
EXPECTED_TURNING_POINTS = [15, 21, 27]


def _run(indicator, losses):
  """Feeds losses; returns the 1-based epochs at which update() said True."""
  found = []
  for loss in losses:
    if indicator.update(loss):
      found.append(indicator.epoch)
  return found


def paper_indicator(**kwargs):
  args = dict(eps=0.05, alpha=0.3, num_turning_points=3)
  args.update(kwargs)
  return TurningPointIndicator(**args)


def test_turning_points_where_worked_out():
  indicator = paper_indicator()
  assert _run(indicator, LOSSES) == EXPECTED_TURNING_POINTS
  assert indicator.turning_point_epochs == EXPECTED_TURNING_POINTS
  assert indicator.stage == len(indicator.turning_point_epochs) == 3
  assert indicator.done


def test_stage_and_threshold_follow_each_turning_point():
  indicator = paper_indicator()
  eps_after = {0: 0.05, 1: 0.05 * 0.3, 2: 0.05 * 0.3 * 0.3, 3: 0.05 * 0.3 * 0.3}
  for epoch, loss in enumerate(LOSSES, start=1):
    indicator.update(loss)
    stage = sum(tp <= epoch for tp in EXPECTED_TURNING_POINTS)
    assert indicator.stage == stage, epoch
    assert indicator.eps == pytest.approx(eps_after[stage], rel=1e-12), epoch


def test_without_threshold_decay_the_second_plateau_comes_earlier():
  # alpha = 1 keeps eps at 0.05, so e20 (d = 0.02) is already a turning point:
  # the decay is what made it a near miss above.
  indicator = paper_indicator(alpha=1.0)
  assert _run(indicator, LOSSES)[:2] == [15, 20]


def test_scale_is_mean_of_first_scale_epochs():
  indicator = paper_indicator()
  for epoch, loss in enumerate(LOSSES, start=1):
    indicator.update(loss)
    first = LOSSES[:min(epoch, 10)]
    assert indicator.scale == pytest.approx(sum(first) / len(first), rel=1e-12)


def test_scale_epochs_changes_the_decision():
  # scale_epochs=2: scale = 10, so at e7 the window 1, 1.3, 1, 1.3, 1 has
  # d = 0.3/10 = 0.03 <= 0.05: a turning point. scale_epochs=10: scale at e7
  # = 25.6/7 = 3.66, d = 0.082 > 0.05: not one.
  losses = [10.0, 10.0, 1.0, 1.3, 1.0, 1.3, 1.0]
  assert _run(paper_indicator(scale_epochs=2), losses) == [7]
  assert _run(paper_indicator(scale_epochs=10), losses) == []


def test_window_length():
  # Constant losses: a turning point each time the emptied window refills.
  assert _run(paper_indicator(window=3), [1.0] * 9) == [3, 6, 9]
  assert _run(paper_indicator(window=5), [1.0] * 15) == [5, 10, 15]


@pytest.mark.parametrize("num_turning_points", [0, 1, 2, 5])
def test_never_more_than_num_turning_points(num_turning_points):
  indicator = paper_indicator(num_turning_points=num_turning_points)
  found = _run(indicator, [1.0] * 40)
  assert found == [5 * (i + 1) for i in range(num_turning_points)]
  assert indicator.stage == num_turning_points


def test_threshold_decays_after_first_two_only():
  indicator = paper_indicator(num_turning_points=5)
  eps = []
  for loss in [1.0] * 25:
    if indicator.update(loss):
      eps.append(indicator.eps)
  assert eps == pytest.approx([0.015, 0.0045, 0.0045, 0.0045, 0.0045], rel=1e-12)


@pytest.mark.parametrize("split", [3, 12, 15, 17, 21, 26, 30])
def test_state_round_trip_mid_sequence(split):
  original = paper_indicator()
  _run(original, LOSSES[:split])
  restored = TurningPointIndicator.from_state_dict(
      json.loads(json.dumps(original.state_dict())))
  assert restored == original
  assert _run(restored, LOSSES[split:]) == _run(original, LOSSES[split:])
  assert restored.state_dict() == original.state_dict()


def test_state_dict_rejects_wrong_keys():
  state = paper_indicator().state_dict()
  del state["eps"]
  with pytest.raises(ValueError, match="eps"):
    TurningPointIndicator.from_state_dict(state)


def test_state_dict_rejects_inconsistent_stage():
  state = paper_indicator().state_dict()
  state["stage"] = 2
  with pytest.raises(ValueError, match="stage"):
    TurningPointIndicator.from_state_dict(state)


@pytest.mark.parametrize("kwargs,name", [
    (dict(eps=-0.1), "eps"),
    (dict(alpha=0.0), "alpha"),
    (dict(num_turning_points=-1), "num_turning_points"),
    (dict(num_turning_points=1.5), "num_turning_points"),
    (dict(window=1), "window"),
    (dict(scale_epochs=0), "scale_epochs"),
])
def test_bad_arguments_are_refused(kwargs, name):
  with pytest.raises(ValueError, match=name):
    paper_indicator(**kwargs)


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_non_finite_loss_is_refused(loss):
  with pytest.raises(ValueError, match="epoch_loss"):
    paper_indicator().update(loss)
