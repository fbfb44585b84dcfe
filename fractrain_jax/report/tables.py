"""The report's Markdown: the runs' table (each against its 8-bit baseline) and candidate mixes.

Two costs per run, labelled apart (SPEC section 2): the whole-model cost and
the paper's convention, each against 8-bit SBM in the same convention; a
third, the quantized-layer cost, where a method quantizes only some layers.
``render_report`` puts the tables and the figures' links into ``report.md``.
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fractrain_jax.report.runs import (Run, block_names, candidate_names, choice_shares, labels,
                                       sci)
from fractrain_jax.run.console import hms


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

  Each task's runs get their own table, under a heading when both are there: image
  classifiers show test accuracy, language models test perplexity.
  """
  names = labels(runs)
  groups = [[(run, name) for run, name in zip(runs, names) if run.is_lm == lm]
            for lm in (False, True)]
  groups = [group for group in groups if group]
  if len(groups) == 1:
    return _task_table(groups[0], runs, names, baseline)
  return "\n".join(f"### {TASK_HEADINGS[group[0][0].is_lm]}\n\n"
                   + _task_table(group, runs, names, baseline) for group in groups)


TASK_HEADINGS = {False: "Image classification (test accuracy)",
                 True: "Language model (test perplexity)"}


def _task_table(rows: Sequence[tuple[Run, str]], runs: Sequence[Run], names: Sequence[str],
                baseline: Run | None) -> str:
  """The table of ``rows``, runs of one task; ``runs`` and ``names`` are all the report's
  (an 8-bit baseline may be any of them)."""
  lm = rows[0][0].is_lm
  result = ["final test ppl", "best test ppl"] if lm else ["final acc (%)", "best acc (%)"]
  quantized = any(r.cost_quantized is not None for r, _ in rows)
  header = ["run", "method", "model", "status", *result,
            "whole-model cost (MACs)", "vs 8-bit", "paper-convention cost (MACs)", "paper vs 8-bit",
            *(["quantized-layer cost (MACs)", "quantized vs 8-bit"] if quantized else []),
            "steering cp (%)", "whole-model cp (%)", "turning points", "wall"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  sources: dict[str, list[str]] = {}
  for run, name in rows:
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
  if any(not r.finished for r, _ in rows):
    lines.append("Unfinished runs (no summary.json): figures so far, from the last metrics line.")
  return "\n".join(lines) + "\n"


def choice_table(run: Run, name: str) -> str | None:
  """Markdown: per block, each candidate's share (%) over the run; None for plain runs."""
  shares = choice_shares(run)
  if shares is None:
    return None
  cands = candidate_names(run, len(shares[0]))
  unit = "tokens" if run.is_lm else "samples"
  lines = [f"Candidate mix of `{name}` (share of {unit} per block over the run, %):", "",
           "| block | " + " | ".join(cands) + " |", "|" + "---|" * (len(cands) + 1)]
  for block, row in zip(block_names(run, len(shares)), shares):
    lines.append(f"| {block} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
  return "\n".join(lines) + "\n"


def render_report(runs: Sequence[Run], baseline: Run | None, figures: Sequence[Path], out_dir: Path) -> str:
  parts = ["# FracTrain runs\n", markdown_table(runs, baseline)]
  mixes = [choice_table(run, name) for run, name in zip(runs, labels(runs))]
  if any(mixes):
    parts += ["\n## Candidate mix\n"] + [m for m in mixes if m]
  if figures:
    parts.append("\n## Figures\n")
    parts += [f"![{p.stem}]({p.relative_to(out_dir)})\n" for p in figures]
  return "\n".join(parts)
