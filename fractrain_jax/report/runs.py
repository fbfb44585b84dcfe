"""A training workdir read back as a ``Run``: its config, metrics lines and summary.

What ``run/train.py`` leaves in a workdir (``config.json``, ``metrics.jsonl``,
``summary.json``; docs/DESIGN.md) read without JAX, for the report's tables
(``tables.py``) and its figures (``plots.py``). A run without
``summary.json`` is still going or was interrupted: its figures come from
the metrics lines.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fractrain_jax.run.files import CONFIG, METRICS, SUMMARY


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


def sci(x: float | None) -> str:
  """Scientific notation with 3 significant digits, as the paper writes it: 1.18e14."""
  if x is None or not math.isfinite(x):
    return "n/a"
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa}e{int(exponent)}"


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


def candidate_names(run: Run, k: int) -> list[str]:
  cands = next((r["candidates"] for r in reversed(run.metrics) if r.get("candidates")), None)
  return ([f"{a}/{g} bits" for a, g in zip(cands[0], cands[1])] if cands
          else [f"candidate {c}" for c in range(k)])
