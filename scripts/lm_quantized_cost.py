"""The quantized layers' share of an LM run's cost, beside the whole-model figure.

    python3 scripts/lm_quantized_cost.py WORKDIR [WORKDIR ...]

The whole-model cost of a Transformer LM run counts its full-precision
layers (embedding-tied output layer, attention products) at 32 bits; with a
large vocabulary they are most of the MACs, so every quantized method lands
near SBM 8/8 there. This prints, per run, the cost of the quantized layers
alone (the QDense projections and MLPs) and its ratio to the same
iterations at SBM 8/8, from the model's own cost table and the precision in
force in each interval of metrics.jsonl. The model's shape comes from the
run's config.json, its vocabulary size from the data line of its log.txt
(or --vocab).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from fractrain_jax import cost, models, run_files  # noqa: E402


def _vocab(workdir: pathlib.Path) -> int:
  match = re.search(r"vocabulary (\d+)", (workdir / run_files.LOG).read_text())
  if not match:
    raise SystemExit(f"{workdir / run_files.LOG} has no 'vocabulary N' line; pass --vocab")
  return int(match.group(1))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
  parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: from log.txt)")
  args = parser.parse_args(argv)
  for workdir in args.workdirs:
    config = json.loads((workdir / run_files.CONFIG).read_text())
    options = {k: config["model"]["lm"][k] for k in models.LM_OPTIONS}
    vocab = args.vocab or _vocab(workdir)
    model = nnx.eval_shape(lambda: models.create(models.LM, num_classes=vocab,
                                                 rngs=nnx.Rngs(0), **options))
    layers = model.layer_macs()
    quantized = [l for l in layers if l.kind == "static"]
    batch = config["train"]["batch_size"]
    spent, prev = 0.0, 0
    for line in map(json.loads, (workdir / run_files.METRICS).read_text().splitlines()):
      bits = None if line["fw_bits"] is None else (line["fw_bits"], line["bw_bits"])
      spent += cost.static_cost(quantized, bits).total * (line["step"] - prev) * batch
      prev = line["step"]
    sbm = cost.static_cost(quantized, (8, 8)).total * prev * batch
    share = cost.total_macs(quantized) / cost.total_macs(layers)
    print(f"{workdir}: quantized layers {100 * share:.1f}% of the MACs; their cost "
          f"{spent:.3g} bit-scaled MACs over {prev} steps, {100 * spent / sbm:.1f}% of SBM 8/8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
