"""Summarise finished or running training workdirs: a Markdown table and PNG plots.

``python -m fractrain_jax.report WORKDIR [WORKDIR ...] [--out DIR] [--baseline WORKDIR]
[--no-plots]``: reads each workdir (``runs.py``), draws the figures (``plots.py``)
and writes ``report.md`` (``tables.py``); the package's docstring says more.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fractrain_jax.report.plots import plot_all
from fractrain_jax.report.runs import load_run
from fractrain_jax.report.tables import render_report
from fractrain_jax.run.files import METRICS


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

