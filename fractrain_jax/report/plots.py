"""The report's figures: accuracy (or perplexity) against cost, precision and cp over a run,
and each gated run's candidate mix.

Built with matplotlib's object API (no pyplot): no global state, no display
needed, and the Agg canvas writes the PNGs. No JAX.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fractrain_jax.report.runs import (Run, block_names, candidate_names, choice_shares, labels,
                                       sci)


def _file_stem(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one per-interval column, for a "steps-pre" line.

  A metrics line's value holds over the interval that ends at its step, so the
  first value is repeated at step 0 to draw the first interval too. Missing
  values become NaN: a gap in the line.
  """
  steps = [int(r["step"]) for r in run.metrics]
  values = [float(r[key]) if r.get(key) is not None else math.nan for r in run.metrics]
  if steps[0] > 0:
    steps, values = [0] + steps, values[:1] + values
  return steps, values


def _mark_run_phases(ax: Any, run: Run) -> None:
  for i, tp in enumerate(run.turning_points):
    ax.axvline(tp, color="grey", linestyle="--", linewidth=0.8, label="turning point" if i == 0 else None)
  fine = [int(r["step"]) for r in run.metrics if r.get("phase") == "finetune"]
  if fine:
    before = [int(r["step"]) for r in run.metrics if r.get("phase") != "finetune" and int(r["step"]) < fine[0]]
    ax.axvspan(before[-1] if before else 0, fine[-1], color="tab:olive", alpha=0.12, label="fine-tuning")


def _save(fig: Any, path: Path) -> Path:
  fig.savefig(path, dpi=110)
  return path


def _log_axis(axis: Any, plain: bool = False) -> None:
  """Log-scale ticks that do not run together: labels at powers of ten only, as 1e13.

  plain: labels as plain numbers at 1, 2 and 5 times the powers of ten (for
  perplexities, whose range is a decade or two).
  """
  from matplotlib.ticker import LogLocator, NullFormatter

  axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if plain else (1.0,),
                                    numticks=12))
  axis.set_major_formatter(lambda x, _: "" if x <= 0 else f"{x:g}" if plain
                           else sci(x).replace(".00e", "e"))
  axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=12))
  axis.set_minor_formatter(NullFormatter())


COST_AXES = {"cost": "cumulative whole-model training cost (bit-scaled MACs)",
             "cost_quantized": "cumulative cost of the quantized layers (bit-scaled MACs)"}


def plot_acc_vs_cost(runs: Sequence[Run], names: Sequence[str], path: Path,
                     key: str = "test_acc", cost_key: str = "cost") -> Path:
  """Test accuracy (or ``key="test_ppl"``: perplexity, log scale) against cumulative cost.

  cost_key: "cost" (whole model) or "cost_quantized" (the quantized layers alone).
  """
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.4, 4.4), layout="constrained")
  ax = fig.add_subplot()
  for run, name in zip(runs, names):
    pts = [(r[cost_key], r[key]) for r in run.metrics
           if r.get(cost_key) and r[cost_key] > 0 and r.get(key) is not None]
    if pts:
      ax.plot(*zip(*pts), marker=".", label=name if run.finished else f"{name} (unfinished)")
  ax.set_xscale("log")  # Before the ticks: setting the scale resets them.
  _log_axis(ax.xaxis)
  ax.set_xlabel(COST_AXES[cost_key])
  if key == "test_ppl":
    ax.set_yscale("log")
    _log_axis(ax.yaxis, plain=True)
    ax.set_ylabel("test perplexity")
  else:
    ax.set_ylabel("test accuracy (%)")
  ax.grid(True, which="both", alpha=0.3)
  if ax.has_data():
    ax.legend(fontsize="small")
  return _save(fig, path)


def plot_precision(run: Run, name: str, path: Path) -> Path:
  return _save(precision_figure(run, name), path)


def precision_figure(run: Run, name: str) -> Any:
  """Top: precision in force (bits, or DFQ's target cp). Bottom: cp measured per interval.

  Gated runs show their steering cp against its target (the figure DFQ
  steers), and the whole-model cp beside it; plain runs their whole-model cp.
  """
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  fig = Figure(figsize=(7.0, 5.0), layout="constrained")
  top, bottom = fig.subplots(2, 1, sharex=True)
  steps, fw = _series(run, "fw_bits")
  _, bw = _series(run, "bw_bits")
  _, target = _series(run, "target_cp")
  _, steer = _series(run, "steer_cp")
  _, model_cp = _series(run, "model_cp")
  has = lambda values: any(not math.isnan(v) for v in values)
  if has(fw + bw):
    top.plot(steps, fw, drawstyle="steps-pre", label="forward bits")
    top.plot(steps, bw, drawstyle="steps-pre", linestyle="--", label="backward bits")
    top.set_ylabel("bits")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
  elif has(target):
    top.plot(steps, target, drawstyle="steps-pre", color="tab:red", label="target cp")
    top.set_ylabel("target steering cp (%)")
  else:
    top.text(0.5, 0.5, "no quantized precision recorded (full precision)",
             ha="center", va="center", transform=top.transAxes)
  if has(steer):
    bottom.plot(steps, steer, drawstyle="steps-pre", color="tab:green", label="steering cp per interval")
    # Its own axis: on the LM, the full-precision output layer puts it near 80 %.
    right = bottom.twinx()
    right.plot(steps, model_cp, drawstyle="steps-pre", color="tab:gray", linewidth=0.8,
               label="whole-model cp per interval (right axis)")
    right.set_ylabel("whole-model cp (%)", color="tab:gray")
    right.legend(fontsize="small", loc="upper right")
  else:
    bottom.plot(steps, model_cp, drawstyle="steps-pre", color="tab:green", label="whole-model cp per interval")
  if has(target):
    bottom.plot(steps, target, drawstyle="steps-pre", color="tab:red", linestyle=":", label="target cp")
  bottom.set_ylabel("steering cp (%)" if has(steer) else "cp (% of FP32 cost)")
  bottom.set_xlabel("step")
  for ax in (top, bottom):
    _mark_run_phases(ax, run)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small", loc="best")
  top.set_title(f"{name}: {run.method} {run.model}" + ("" if run.finished else " (unfinished)"))
  return fig


def plot_choices(run: Run, name: str, path: Path) -> Path | None:
  """Stacked bar per block: how often each candidate precision was picked."""
  from matplotlib.figure import Figure

  shares = choice_shares(run)
  if shares is None:
    return None
  k = len(shares[0])
  names = candidate_names(run, k)
  fig = Figure(figsize=(max(6.0, 0.3 * len(shares) + 2.0), 4.2), layout="constrained")
  ax = fig.add_subplot()
  blocks = list(range(len(shares)))
  bottom = [0.0] * len(shares)
  for c in range(k):
    heights = [100 * s[c] for s in shares]
    ax.bar(blocks, heights, bottom=bottom, label=names[c])
    bottom = [b + h for b, h in zip(bottom, heights)]
  ticks = blocks[:: max(1, len(blocks) // 20)]
  ax.set_xticks(ticks, [block_names(run, len(blocks))[b] for b in ticks],
                rotation=30 if run.is_lm else 0)
  ax.set_xlabel("sublayer (decision before it)" if run.is_lm else "block (decision before it)")
  ax.set_ylabel(f"share of {'tokens' if run.is_lm else 'samples'} (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"{name}: precision choices over the run (fw/bw)")
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return _save(fig, path)


def _columns(pairs: Sequence[tuple[Run, str]]) -> tuple[list[Run], list[str]]:
  return [run for run, _ in pairs], [name for _, name in pairs]


def plot_all(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
  """Write every figure into `out_dir` (created if needed); returns their paths."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  names = labels(runs)
  # One task per figure: token accuracy and image accuracy are not one axis.
  images = [(r, n) for r, n in zip(runs, names) if not r.is_lm]
  lms = [(r, n) for r, n in zip(runs, names) if r.is_lm]
  paths = []
  if images or not lms:
    paths.append(plot_acc_vs_cost(*_columns(images), out_dir / "acc_vs_cost.png"))
  if lms:
    paths.append(plot_acc_vs_cost(*_columns(lms), out_dir / "ppl_vs_cost.png", key="test_ppl"))
    if any(r.cost_quantized is not None for r, _ in lms):
      paths.append(plot_acc_vs_cost(*_columns(lms), out_dir / "ppl_vs_quantized_cost.png",
                                    key="test_ppl", cost_key="cost_quantized"))
  for run, name in zip(runs, names):
    paths.append(plot_precision(run, name, out_dir / f"precision_{_file_stem(name)}.png"))
    choices = plot_choices(run, name, out_dir / f"choices_{_file_stem(name)}.png")
    if choices is not None:
      paths.append(choices)
  return paths
