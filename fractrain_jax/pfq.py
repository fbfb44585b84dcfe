"""PFQ's turning-point indicator (SPEC section 3, Alg. 1 of the paper).

The trainer feeds it one loss per indicator "epoch" (``train.eval_every``
iterations, the mean training loss over them). It answers whether that epoch
is a turning point: the loss has plateaued, so PFQ moves to the next precision
stage and FracTrain raises DFQ's target cp. It is plain Python on host floats,
called once per epoch, and its whole state is a small JSON-serializable dict
saved with the checkpoints.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

# After this many turning points the threshold stops decaying (SPEC section 3:
# eps *= alpha after the first and the second turning point only).
DECAYING_TURNING_POINTS = 2


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


class TurningPointIndicator:
  """Finds the epochs at which the training loss has plateaued.

  * ``scale`` is the mean loss of the first ``min(epoch, scale_epochs)``
    epochs, so epoch losses are compared relative to the loss level of early
    training.
  * The last ``window`` epoch losses are held. Once the window is full,
    ``d_i = |L_i - L_last| / scale`` for the earlier ones; the epoch is a
    turning point when every ``d_i <= eps``.
  * At a turning point the stage advances, the window is emptied and, after
    the first and second turning points only, ``eps *= alpha``.
  * After ``num_turning_points`` the indicator answers False for good.

  Attributes:
    stage: Index of the current precision stage, 0..num_turning_points.
    eps: The current threshold.
    turning_point_epochs: The 1-based epoch of each turning point.
    epoch: Epoch losses seen so far.
  """

  def __init__(self, eps: float, alpha: float, num_turning_points: int,
               window: int = 5, scale_epochs: int = 10):
    if not (_is_real(eps) and eps >= 0):
      raise ValueError(f"eps={eps!r}; expected a number >= 0")
    if not (_is_real(alpha) and alpha > 0):
      raise ValueError(f"alpha={alpha!r}; expected a number > 0")
    if not (_is_int(num_turning_points) and num_turning_points >= 0):
      raise ValueError(
          f"num_turning_points={num_turning_points!r}; expected an int >= 0")
    if not (_is_int(window) and window >= 2):
      raise ValueError(
          f"window={window!r}; expected an int >= 2 (earlier losses are "
          "compared with the last one)")
    if not (_is_int(scale_epochs) and scale_epochs >= 1):
      raise ValueError(f"scale_epochs={scale_epochs!r}; expected an int >= 1")
    self.initial_eps = float(eps)
    self.alpha = float(alpha)
    self.num_turning_points = int(num_turning_points)
    self.window = int(window)
    self.scale_epochs = int(scale_epochs)
    self.eps = float(eps)
    self.epoch = 0
    self.turning_point_epochs: list[int] = []
    self._scale_losses: list[float] = []
    self._window_losses: list[float] = []

  @property
  def stage(self) -> int:
    """Index of the current precision stage: one per turning point found."""
    return len(self.turning_point_epochs)

  @property
  def done(self) -> bool:
    """True once every turning point has been found."""
    return self.stage >= self.num_turning_points

  @property
  def scale(self) -> float:
    """Mean loss of the first min(epoch, scale_epochs) epochs (nan before any)."""
    if not self._scale_losses:
      return math.nan
    return math.fsum(self._scale_losses) / len(self._scale_losses)

  def update(self, epoch_loss: float) -> bool:
    """Records one epoch's mean training loss; True when it is a turning point."""
    loss = float(epoch_loss)
    if not math.isfinite(loss):
      raise ValueError(
          f"epoch_loss={epoch_loss!r} is not finite; the indicator needs the "
          "finite mean training loss of the epoch")
    self.epoch += 1
    if len(self._scale_losses) < self.scale_epochs:
      self._scale_losses.append(loss)
    if self.done:
      return False
    self._window_losses.append(loss)
    if len(self._window_losses) > self.window:
      self._window_losses.pop(0)
    if len(self._window_losses) < self.window:
      return False
    scale = self.scale
    last = self._window_losses[-1]
    if scale > 0:
      distances = [abs(l - last) / scale for l in self._window_losses[:-1]]
    else:
      # Only when every early loss was exactly 0: a flat zero loss plateaus.
      distances = [0.0 if l == last else math.inf for l in self._window_losses[:-1]]
    if not all(d <= self.eps for d in distances):
      return False
    self.turning_point_epochs.append(self.epoch)
    self._window_losses = []
    if self.stage <= DECAYING_TURNING_POINTS:
      self.eps *= self.alpha
    return True

  def state_dict(self) -> dict[str, Any]:
    """The whole state as JSON-serializable Python values."""
    return {
        "initial_eps": self.initial_eps,
        "alpha": self.alpha,
        "num_turning_points": self.num_turning_points,
        "window": self.window,
        "scale_epochs": self.scale_epochs,
        "eps": self.eps,
        "stage": self.stage,
        "epoch": self.epoch,
        "turning_point_epochs": list(self.turning_point_epochs),
        "scale_losses": list(self._scale_losses),
        "window_losses": list(self._window_losses),
    }

  @classmethod
  def from_config(cls, pfq_config: Any, state: dict[str, Any] | None = None
                  ) -> TurningPointIndicator:
    """A new indicator with ``config.pfq``'s settings, or the one ``state`` saved."""
    if state is not None:
      return cls.from_state_dict(state)
    p = pfq_config
    return cls(eps=p.eps, alpha=p.alpha, num_turning_points=p.num_turning_points,
               window=p.window, scale_epochs=p.scale_epochs)

  @classmethod
  def from_state_dict(cls, d: dict[str, Any]) -> TurningPointIndicator:
    """The indicator that ``state_dict()`` described; it decides identically."""
    expected = set(cls(0.0, 1.0, 0).state_dict())
    if set(d) != expected:
      raise ValueError(
          f"indicator state has keys {sorted(d)}; expected {sorted(expected)}")
    indicator = cls(d["initial_eps"], d["alpha"], d["num_turning_points"],
                    d["window"], d["scale_epochs"])
    indicator.eps = float(d["eps"])
    indicator.epoch = int(d["epoch"])
    indicator.turning_point_epochs = [int(e) for e in d["turning_point_epochs"]]
    indicator._scale_losses = [float(l) for l in d["scale_losses"]]  # pylint: disable=protected-access
    indicator._window_losses = [float(l) for l in d["window_losses"]]  # pylint: disable=protected-access
    if indicator.stage != d["stage"]:
      raise ValueError(
          f"indicator state has stage={d['stage']!r} but "
          f"{indicator.stage} turning_point_epochs; expected them to agree")
    return indicator

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, TurningPointIndicator):
      return NotImplemented
    return self.state_dict() == other.state_dict()

  def __repr__(self) -> str:
    return (f"TurningPointIndicator(stage={self.stage}, eps={self.eps}, "
            f"epoch={self.epoch}, turning_points={self.turning_point_epochs})")
