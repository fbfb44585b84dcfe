"""Summarise finished or running training workdirs: a Markdown table and PNG plots.

    python -m fractrain_jax.report WORKDIR [WORKDIR ...] [--out DIR] [--baseline WORKDIR] [--no-plots]

Reads what `fractrain_jax/run/train.py` leaves in a workdir (`config.json`,
`metrics.jsonl`, `summary.json`; see docs/DESIGN.md) through `runs.py`,
writes its tables with `tables.py`, draws with `plots.py` (`cli.py` is the
command), and never imports JAX, so it runs anywhere the run's files can be
copied to.

Plots and `report.md` go to `--out`; without it, to `report/` beside the first
workdir (the folder that holds the workdirs), so that
`report $OUT/sbm $OUT/frac` writes `$OUT/report/`.

A run without `summary.json` is still going or was interrupted: its figures
come from the metrics lines and its table row says "unfinished". A workdir
with no metrics yet is skipped with a warning.

Two costs per run, labelled apart (SPEC section 2): the whole-model cost (real
per-layer MACs, the gated models' full-precision layers at 32 bits) and the
paper's convention (mean steering cp, for plain runs the cp of their quantized
layers, times the FP32 cost), which is what the paper's tables compare. Each
is shown against 8-bit SBM in the same convention.
A third, the quantized-layer cost (the layers the method quantizes, alone,
against the same layers at 8/8 bits), shows what a method saves where a
full-precision layer dominates the whole model (the LM's output layer).
Gated runs also get a table of each block's candidate mix (the LM's blocks
are its attention and MLP sublayers).

Image classifiers and language models given together get a table each (test
accuracy, test perplexity) and a figure each: token accuracy is never shown
as if it were image accuracy.

What it may import: of this package, only ``run.files`` (a workdir's file
names) and ``run.console`` (``hms``), both free of JAX; never the training
loop, the algorithm or JAX (``tests/test_layout.py`` checks it). Nothing but
the command line imports the report.
"""

from fractrain_jax.report.cli import main
from fractrain_jax.report.plots import plot_all, precision_figure
from fractrain_jax.report.runs import Run, choice_shares, labels, load_run, sci
from fractrain_jax.report.tables import choice_table, markdown_table

__all__ = ["Run", "choice_shares", "choice_table", "labels", "load_run", "main",
           "markdown_table", "plot_all", "precision_figure", "sci"]
