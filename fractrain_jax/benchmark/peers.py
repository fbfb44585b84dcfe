"""The peer table of ``scripts/peer_speed.sh``: ``python -m fractrain_jax.benchmark.peers FILE``.

FILE holds JSON lines from ``scripts/peer_speed_torch.py`` (with a ``system``
field) and from ``python -m fractrain_jax.benchmark step --json`` (without
one), several rounds of each; the benchmark's ``*_xla`` variants (XLA's convs and
BatchNorms, the default before oneDNN's) get a row of their own. Every cell is the median of the rounds' medians,
in ms, with the ratio to that system's FP32 step; the last lines give the
project's FP32 step over plain PyTorch's channels-last step, and its PFQ step
over the authors' PFQ step.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

# The benchmark's variants that time a method with train.kernels="xla".
BEFORE = "_xla"
BEFORE_ROW = "XLA's kernels"
COLUMNS = (("fp32", "FP32"), ("static", "static 8/8"), ("pfq", "PFQ"), ("dfq", "DFQ"),
           ("frac", "FracTrain"))
BASE = COLUMNS[0][0]  # Each row's ratios are to its FP32 step.


def read(lines) -> dict[str, dict[str, list[float]]]:
  """system -> method -> the step medians of its rounds (ms)."""
  cells: dict[str, dict[str, list[float]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for line in lines:
    line = line.strip()
    if not line.startswith("{"):
      continue
    row = json.loads(line)
    if "system" in row:
      system = row["system"]
    elif row.get("bench") == "step":
      system = f"fractrain-jax ({row['model']})"
    else:
      continue
    method = row["method"]
    if method.endswith(BEFORE):  # The same step on XLA's kernels: its own row.
      system, method = f"{system}, {BEFORE_ROW}", method[:-len(BEFORE)]
    cells[system][method].append(row["step_ms"])
  return cells


def table(cells: dict[str, dict[str, list[float]]]) -> str:
  out = ["| system | " + " | ".join(title for _, title in COLUMNS) + " |",
         "| --- |" + " --- |" * len(COLUMNS)]
  medians = {s: {m: statistics.median(v) for m, v in methods.items()}
             for s, methods in cells.items()}
  for system, ms in medians.items():
    row = []
    for method, _ in COLUMNS:
      if method not in ms:
        row.append("")
      elif method == BASE or BASE not in ms:
        row.append(f"{ms[method]:,.1f} ms")
      else:
        row.append(f"{ms[method]:,.1f} ms ({ms[method] / ms[BASE]:.2f}x)")
    out.append(f"| {system} | " + " | ".join(row) + " |")
  ours = next((ms for s, ms in medians.items()
               if s.startswith("fractrain-jax") and not s.endswith(BEFORE_ROW)), None)
  plain = next((ms for s, ms in medians.items() if s.startswith("plain") and "channels_last" in s),
               None)
  authors = next((ms for s, ms in medians.items() if s.startswith("the authors'")), None)
  rounds = max(len(v) for methods in cells.values() for v in methods.values())
  out.append("")
  out.append(f"Medians of {rounds} round(s). ")
  if ours and plain and BASE in ours:
    out.append(f"fractrain-jax FP32 / plain PyTorch channels-last FP32: "
               f"{ours[BASE] / plain[BASE]:.2f}x. ")
  if ours and authors and "pfq" in ours and "pfq" in authors:
    out.append(f"fractrain-jax PFQ / the authors' PFQ: {ours['pfq'] / authors['pfq']:.2f}x.")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fractrain_jax.benchmark.peers",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("file", help="JSON lines of scripts/peer_speed.sh")
  args = parser.parse_args(argv)
  try:
    with open(args.file, encoding="utf-8") as f:
      cells = read(f)
  except OSError as err:
    parser.error(f"{args.file}: {err.strerror}")
  if not cells:
    parser.error(f"{args.file}: no step timings in it")
  print(table(cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())
