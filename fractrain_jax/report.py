"""Summarise finished or running training workdirs: a Markdown table and PNG plots.

    python -m fractrain_jax.report WORKDIR [WORKDIR ...] [--out DIR] [--baseline WORKDIR] [--no-plots]

Reads what `fractrain_jax/train.py` leaves in a workdir (`config.json`,
`metrics.jsonl`, `summary.json`; see docs/DESIGN.md) and never imports JAX, so
it runs anywhere the run's files can be copied to.

Plots and `report.md` go to `--out`; without it, to `report/` beside the first
workdir (the folder that holds the workdirs), so that
`report $OUT/sbm $OUT/frac` writes `$OUT/report/`.

A run without `summary.json` is still going or was interrupted: its figures
come from the metrics lines and its table row says "unfinished". A workdir
with no metrics yet is skipped with a warning.

Two costs per run, labelled apart (SPEC section 2): the whole-model cost (real
per-layer MACs, the gated models' full-precision layers at 32 bits) and the
paper's convention (mean steering cp, for plain runs the cp of their quantized
layers, times the FP32 cost), which is what the paper's tables compare. Each is shown against 8-bit SBM in the same convention.
A third, the quantized-layer cost (the layers the method quantizes, alone,
against the same layers at 8/8 bits), shows what a method saves where a
full-precision layer dominates the whole model (the LM's output layer).
Gated runs also get a table of each block's candidate mix (the LM's blocks
are its attention and MLP sublayers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fractrain_jax.console import hms
from fractrain_jax.run_files import CONFIG, METRICS, SUMMARY


@dataclass
class Run:
  """One workdir's results; summary values when finished, derived from metrics otherwise."""

  workdir: Path
  config: dict[str, Any]
  metrics: list[dict[str, Any]]
  summary: dict[str, Any] | None
  method: str
  model: str
  dataset: str
  iters: int | None
  last_step: int
  final_test_acc: float | None
  best_test_acc: float | None
  total_cost: float | None
  cost_fw: float | None
  cost_eb: float | None
  cost_gc: float | None
  cost_paper: float | None
  cost_fp32: float | None
  cost_sbm8: float | None
  mean_model_cp: float | None
  mean_steer_cp: float | None
  turning_points: list[int] = field(default_factory=list)
  wall_s: float | None = None
  final_test_ppl: float | None = None  # Language-model runs only.
  best_test_ppl: float | None = None
  cost_quantized: float | None = None  # The quantized layers alone.
  cost_quantized_sbm8: float | None = None  # The same layers at 8/8 bits.

  @property
  def is_lm(self) -> bool:
    """A language-model run: it reports perplexity rather than accuracy."""
    return self.final_test_ppl is not None

  @property
  def name(self) -> str:
    return self.workdir.name

  @property
  def finished(self) -> bool:
    return self.summary is not None


def _cfg(config: dict[str, Any], dotted: str) -> Any:
  """`config["a"]["b"]` for "a.b", also accepting flat dotted keys; None when absent."""
  if dotted in config:
    return config[dotted]
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _read_metrics(path: Path) -> list[dict[str, Any]]:
  lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
  rows: list[dict[str, Any]] = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as err:
      # A run killed mid-write leaves a torn last line: drop it, keep the rest.
      if i == len(lines) - 1 and rows:
        print(f"warning: {path}: ignoring incomplete last line", file=sys.stderr)
        break
      raise ValueError(f"{path}:{i + 1}: not a JSON line ({err})") from err
  if not rows:
    raise ValueError(f"{path}: no metrics lines yet")
  return rows


def _interval_weights(metrics: list[dict[str, Any]]) -> list[int]:
  """Iterations covered by each metrics line (each line sums up the interval since the previous)."""
  weights, prev = [], 0
  for row in metrics:
    weights.append(max(int(row["step"]) - prev, 0))
    prev = int(row["step"])
  return weights


def derive_turning_points(metrics: list[dict[str, Any]]) -> list[int]:
  """Steps at which the stage rose, read off the `stage` column.

  A line's `stage` is the one in force during the interval it sums up, so a
  rise between two lines happened at the earlier line's step (the indicator
  runs at the evaluation boundary).
  """
  points, prev_stage, prev_step = [], None, 0
  for row in metrics:
    stage = row.get("stage")
    if stage is not None and prev_stage is not None and stage > prev_stage:
      points.append(prev_step)
    if stage is not None:
      prev_stage = stage
    prev_step = int(row["step"])
  return points


def _weighted_mean(metrics: list[dict[str, Any]], key: str) -> float | None:
  """Mean of a per-interval column over the run, each interval weighted by its length."""
  pairs = [(w, r[key]) for w, r in zip(_interval_weights(metrics), metrics) if r.get(key) is not None]
  total = sum(w for w, _ in pairs)
  return sum(w * cp for w, cp in pairs) / total if total else None


def load_run(workdir: str | Path) -> Run:
  """Read one workdir; raises FileNotFoundError naming the missing metrics file."""
  workdir = Path(workdir)
  metrics_path = workdir / METRICS
  if not metrics_path.is_file():
    raise FileNotFoundError(f"no {METRICS} in {workdir} (looked for {metrics_path})")
  metrics = _read_metrics(metrics_path)
  config = json.loads((workdir / CONFIG).read_text()) if (workdir / CONFIG).is_file() else {}
  summary = json.loads((workdir / SUMMARY).read_text()) if (workdir / SUMMARY).is_file() else None
  s = summary or {}
  last = metrics[-1]

  def pick(key: str, fallback: Any) -> Any:
    return s[key] if s.get(key) is not None else fallback

  accs = [r["test_acc"] for r in metrics if r.get("test_acc") is not None]
  ppls = [r["test_ppl"] for r in metrics if r.get("test_ppl") is not None]
  iters = pick("iters", _cfg(config, "train.iters"))
  return Run(
      workdir=workdir,
      config=config,
      metrics=metrics,
      summary=summary,
      method=str(pick("method", last.get("method") or _cfg(config, "method") or "?")),
      model=str(pick("model", last.get("model") or _cfg(config, "model.name") or "?")),
      dataset=str(pick("dataset", _cfg(config, "data.dataset") or "?")),
      iters=int(iters) if iters is not None else None,
      last_step=int(last["step"]),
      final_test_acc=pick("final_test_acc", accs[-1] if accs else None),
      best_test_acc=pick("best_test_acc", max(accs) if accs else None),
      total_cost=pick("total_cost", last.get("cost")),
      cost_fw=pick("cost_fw", last.get("cost_fw")),
      cost_eb=pick("cost_eb", last.get("cost_eb")),
      cost_gc=pick("cost_gc", last.get("cost_gc")),
      cost_paper=pick("cost_paper", last.get("cost_paper")),
      cost_fp32=s.get("cost_fp32"),
      cost_sbm8=s.get("cost_sbm8"),
      mean_model_cp=pick("mean_model_cp", _weighted_mean(metrics, "model_cp")),
      mean_steer_cp=pick("mean_steer_cp", _weighted_mean(metrics, "steer_cp")),
      turning_points=[int(t) for t in pick("turning_points", derive_turning_points(metrics))],
      wall_s=pick("wall_s", last.get("wall_s")),
      final_test_ppl=pick("final_test_ppl", ppls[-1] if ppls else None),
      best_test_ppl=pick("best_test_ppl", min(ppls) if ppls else None),
      cost_quantized=pick("cost_quantized", last.get("cost_quantized")),
      cost_quantized_sbm8=s.get("cost_quantized_sbm8"),
  )


def labels(runs: Sequence[Run]) -> list[str]:
  """Unique display names: the workdir's name, prefixed by its parent where names clash."""
  names = [r.name for r in runs]
  out = [f"{r.workdir.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]
  return [f"{n}#{i}" if out.count(n) > 1 else n for i, n in enumerate(out)]


def is_static8(run: Run) -> bool:
  """A run at 8/8 bits from start to end (SBM 8/8), read off its metrics lines."""
  return all((r.get("fw_bits"), r.get("bw_bits")) == (8, 8) for r in run.metrics)


@dataclass(frozen=True)
class Baseline:
  """The 8-bit SBM cost a run is compared with, in both conventions, and where it comes from."""

  cost: float | None
  cost_paper: float | None
  source: str


def baseline_for(run: Run, runs: Sequence[Run], names: Sequence[str],
                 baseline: Run | None = None) -> Baseline:
  """The 8-bit cost `run` is compared with.

  Order: the explicit baseline; else a finished static 8/8 run of the same
  model and dataset among `runs` (an unfinished one has not paid its whole
  cost yet); else the run's own `cost_sbm8` (and, in the paper's convention,
  6.25% of its `cost_fp32`); else none.
  """
  if baseline is not None:
    return Baseline(baseline.total_cost, baseline.cost_paper,
                    f"run `{baseline.workdir}` (given with --baseline, total {sci(baseline.total_cost)})")
  for other, name in zip(runs, names):
    if other.finished and is_static8(other) and (other.model, other.dataset) == (run.model, run.dataset):
      return Baseline(other.total_cost, other.cost_paper,
                      f"run `{name}` (static 8/8 bits, total {sci(other.total_cost)})")
  if run.cost_sbm8 is not None:
    paper = run.cost_fp32 * (8 * 8 / 32**2) if run.cost_fp32 is not None else None
    return Baseline(run.cost_sbm8, paper, "its own `cost_sbm8` (the same iterations at static 8/8 bits)")
  return Baseline(None, None, "nothing (no static 8/8 run among the inputs and no summary.json with cost_sbm8)")


def _ratio(cost: float | None, base: float | None) -> str:
  if not base or cost is None:
    return "n/a"
  percent = 100 * cost / base
  return f"{percent:.3g}%" if percent < 1000 else f"{percent:,.0f}%"


def sci(x: float | None) -> str:
  """Scientific notation with 3 significant digits, as the paper writes it: 1.18e14."""
  if x is None or not math.isfinite(x):
    return "n/a"
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _num(x: float | None, fmt: str) -> str:
  return "n/a" if x is None else format(x, fmt)


def _steer_cell(run: Run) -> str:
  """Mean steering cp, and the range of targets it was steered to."""
  if run.mean_steer_cp is None:
    return "-"
  targets = [r["target_cp"] for r in run.metrics if r.get("target_cp") is not None]
  if not targets:
    return f"{run.mean_steer_cp:.2f}"
  span = f"{targets[0]:g}" if min(targets) == max(targets) else f"{targets[0]:g} -> {targets[-1]:g}"
  return f"{run.mean_steer_cp:.2f} (target {span})"


def markdown_table(runs: Sequence[Run], baseline: Run | None = None) -> str:
  """One row per run, then a line saying what each relative cost is relative to.

  A table of language-model runs only shows test perplexity where the others
  show accuracy.
  """
  names = labels(runs)
  lm = bool(runs) and all(r.is_lm for r in runs)
  result = ["final test ppl", "best test ppl"] if lm else ["final acc (%)", "best acc (%)"]
  quantized = any(r.cost_quantized is not None for r in runs)
  header = ["run", "method", "model", "status", *result,
            "whole-model cost (MACs)", "vs 8-bit", "paper-convention cost (MACs)", "paper vs 8-bit",
            *(["quantized-layer cost (MACs)", "quantized vs 8-bit"] if quantized else []),
            "steering cp (%)", "whole-model cp (%)", "turning points", "wall"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  sources: dict[str, list[str]] = {}
  for run, name in zip(runs, names):
    base = baseline_for(run, runs, names, baseline)
    sources.setdefault(base.source, []).append(name)
    total = run.iters if run.iters is not None else "?"
    status = "done" if run.finished else f"unfinished (step {run.last_step}/{total})"
    tps = ", ".join(str(t) for t in run.turning_points) or "-"
    results = ((run.final_test_ppl, run.best_test_ppl) if lm
               else (run.final_test_acc, run.best_test_acc))
    cells = [name, run.method, run.model, status, *(_num(r, ".2f") for r in results),
             sci(run.total_cost), _ratio(run.total_cost, base.cost),
             sci(run.cost_paper), _ratio(run.cost_paper, base.cost_paper),
             *([sci(run.cost_quantized), _ratio(run.cost_quantized, run.cost_quantized_sbm8)]
               if quantized else []), _steer_cell(run),
             _num(run.mean_model_cp, ".2f"), tps, hms(run.wall_s)]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Whole-model cost: real per-layer MACs of every layer, full-precision ones at 32 bits. "
               "Paper convention: mean steering cp (gated runs; the quantized layers' cp "
               "otherwise) times the FP32 cost, as the paper's tables count.")
  if quantized:
    lines.append("Quantized-layer cost: the layers the method quantizes (a gated model's gated "
                 "blocks), alone; 'quantized vs 8-bit' against the same layers at 8/8 bits "
                 "(n/a before summary.json).")
  for source, who in sources.items():
    lines.append(f"vs 8-bit for {', '.join(f'`{w}`' for w in who)}: relative to {source}.")
  if any(not r.finished for r in runs):
    lines.append("Unfinished runs (no summary.json): figures so far, from the last metrics line.")
  return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------
# Figures are built with matplotlib's object API (no pyplot): no global state,
# no display needed, and the Agg canvas writes the PNGs.


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


def choice_shares(run: Run) -> list[list[float]] | None:
  """Per block, the share of each candidate over the whole run (intervals weighted by length)."""
  rows = [(w, r["choice_ratio"]) for w, r in zip(_interval_weights(run.metrics), run.metrics)
          if r.get("choice_ratio")]
  if not rows:
    return None
  n_blocks, k = len(rows[0][1]), len(rows[0][1][0])
  acc = [[0.0] * k for _ in range(n_blocks)]
  for w, ratio in rows:
    for b in range(n_blocks):
      for c in range(k):
        acc[b][c] += w * ratio[b][c]
  shares = []
  for block in acc:
    total = sum(block)
    shares.append([v / total if total else 0.0 for v in block])
  return shares


def block_names(run: Run, count: int) -> list[str]:
  """Display names of a gated run's blocks: the LM's are its attention and MLP sublayers."""
  if run.is_lm:
    return [f"{b // 2}.{'attention' if b % 2 == 0 else 'MLP'}" for b in range(count)]
  return [str(b) for b in range(count)]


def _candidate_names(run: Run, k: int) -> list[str]:
  cands = next((r["candidates"] for r in reversed(run.metrics) if r.get("candidates")), None)
  return ([f"{a}/{g} bits" for a, g in zip(cands[0], cands[1])] if cands
          else [f"candidate {c}" for c in range(k)])


def choice_table(run: Run, name: str) -> str | None:
  """Markdown: per block, each candidate's share (%) over the run; None for plain runs."""
  shares = choice_shares(run)
  if shares is None:
    return None
  cands = _candidate_names(run, len(shares[0]))
  unit = "tokens" if run.is_lm else "samples"
  lines = [f"Candidate mix of `{name}` (share of {unit} per block over the run, %):", "",
           "| block | " + " | ".join(cands) + " |", "|" + "---|" * (len(cands) + 1)]
  for block, row in zip(block_names(run, len(shares)), shares):
    lines.append(f"| {block} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
  return "\n".join(lines) + "\n"


def plot_choices(run: Run, name: str, path: Path) -> Path | None:
  """Stacked bar per block: how often each candidate precision was picked."""
  from matplotlib.figure import Figure

  shares = choice_shares(run)
  if shares is None:
    return None
  k = len(shares[0])
  names = _candidate_names(run, k)
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


def plot_all(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
  """Write every figure into `out_dir` (created if needed); returns their paths."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  names = labels(runs)
  if runs and all(r.is_lm for r in runs):
    paths = [plot_acc_vs_cost(runs, names, out_dir / "ppl_vs_cost.png", key="test_ppl")]
    if any(r.cost_quantized is not None for r in runs):
      paths.append(plot_acc_vs_cost(runs, names, out_dir / "ppl_vs_quantized_cost.png",
                                    key="test_ppl", cost_key="cost_quantized"))
  else:
    paths = [plot_acc_vs_cost(runs, names, out_dir / "acc_vs_cost.png")]
  for run, name in zip(runs, names):
    paths.append(plot_precision(run, name, out_dir / f"precision_{_file_stem(name)}.png"))
    choices = plot_choices(run, name, out_dir / f"choices_{_file_stem(name)}.png")
    if choices is not None:
      paths.append(choices)
  return paths


def render_report(runs: Sequence[Run], baseline: Run | None, figures: Sequence[Path], out_dir: Path) -> str:
  parts = ["# FracTrain runs\n", markdown_table(runs, baseline)]
  mixes = [choice_table(run, name) for run, name in zip(runs, labels(runs))]
  if any(mixes):
    parts += ["\n## Candidate mix\n"] + [m for m in mixes if m]
  if figures:
    parts.append("\n## Figures\n")
    parts += [f"![{p.stem}]({p.relative_to(out_dir)})\n" for p in figures]
  return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fractrain_jax.report", description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", type=Path, help="training workdirs (with metrics.jsonl)")
  parser.add_argument("--out", type=Path, default=None,
                      help="folder for report.md and the PNGs (default: report/ beside the first workdir)")
  parser.add_argument("--baseline", type=Path, default=None,
                      help="workdir of the 8-bit run every relative cost is measured against")
  parser.add_argument("--no-plots", action="store_true", help="only the table and report.md")
  args = parser.parse_args(argv)
  out_dir = args.out if args.out is not None else args.workdirs[0].resolve().parent / "report"
  # `report $OUT/*` after an earlier report would also name the output folder.
  if out_dir.resolve() in [w.resolve() for w in args.workdirs] and not (out_dir / METRICS).exists():
    print(f"note: skipping {out_dir} (the report's own output folder)", file=sys.stderr)
    args.workdirs = [w for w in args.workdirs if w.resolve() != out_dir.resolve()]
  if not args.workdirs:
    parser.error("no workdir left to report on")
  runs = []
  for workdir in args.workdirs:
    try:
      runs.append(load_run(workdir))
    except (FileNotFoundError, ValueError) as err:
      # A run that has not reached its first evaluation has nothing to show yet.
      print(f"warning: skipping {workdir}: {err}", file=sys.stderr)
  try:
    baseline = load_run(args.baseline) if args.baseline is not None else None
  except (FileNotFoundError, ValueError) as err:
    print(f"error: --baseline: {err}", file=sys.stderr)
    return 2
  if not runs:
    print("error: none of the workdirs has metrics yet", file=sys.stderr)
    return 2
  out_dir.mkdir(parents=True, exist_ok=True)
  figures = [] if args.no_plots else plot_all(runs, out_dir)
  text = render_report(runs, baseline, figures, out_dir)
  (out_dir / "report.md").write_text(text)
  print(text)
  print(f"wrote {out_dir / 'report.md'} and {len(figures)} figures", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
