"""Tests of fractrain_jax.report on synthetic workdirs.

Every workdir here is a hand-written test fixture in tmp_path, shaped like what
train.py writes (config.json, metrics.jsonl, summary.json); the numbers are
chosen so the expected table cells can be worked out by hand.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fractrain_jax import report
from fractrain_jax.report import plots as report_plots

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CANDIDATES = [[3, 4, 4, 6, 6], [6, 6, 8, 8, 12]]


def _line(step: int, **extra: Any) -> dict[str, Any]:
  row = {"step": step, "epoch": step // 100, "lr": 0.1, "train_loss": 1.0, "train_acc": 60.0,
         "test_loss": 1.1, "test_acc": 55.0, "stage": 0, "fw_bits": None, "bw_bits": None,
         "target_cp": None, "steer_cp": None, "model_cp": 10.0, "cost": step * 1e10,
         "cost_paper": step * 1e10, "cost_fw": step * 4e9,
         "cost_eb": step * 3e9, "cost_gc": step * 3e9, "wall_s": step * 0.5,
         "method": "static", "model": "resnet38", "phase": "train"}
  row.update(extra)
  return row


def make_workdir(root: Path, name: str, *, method: str, model: str = "resnet38", bits: tuple | None = None,
                 lines: list[dict[str, Any]], summary: dict[str, Any] | None = None,
                 iters: int = 1000, raw_tail: str = "") -> Path:
  """Write a fixture workdir; `raw_tail` is appended verbatim to metrics.jsonl."""
  wd = root / name
  wd.mkdir(parents=True)
  config = {"method": method, "seed": 0, "model": {"name": model}, "data": {"dataset": "cifar10"},
            "train": {"iters": iters, "batch_size": 128, "eval_every": 100},
            "quant": {"fw_bits": bits[0] if bits else None, "bw_bits": bits[1] if bits else None}}
  (wd / "config.json").write_text(json.dumps(config))
  body = "".join(json.dumps({**ln, "method": method, "model": model}) + "\n" for ln in lines)
  (wd / "metrics.jsonl").write_text(body + raw_tail)
  if summary is not None:
    full = {"method": method, "model": model, "dataset": "cifar10", "iters": iters,
            "turning_points": [], "cost_fp32": None, "cost_sbm8": None}
    full.update(summary)
    (wd / "summary.json").write_text(json.dumps(full))
  return wd


def sbm(root: Path, name: str = "sbm_resnet38", *, model: str = "resnet38", bits: tuple = (8, 8),
        total: float = 1.18e14, finished: bool = True) -> Path:
  lines = [_line(s, fw_bits=bits[0], bw_bits=bits[1], model_cp=18.75) for s in (500, 1000)]
  summary = ({"final_test_acc": 92.66, "best_test_acc": 92.80, "total_cost": total, "cost_fw": total / 3,
              "cost_eb": total / 3, "cost_gc": total / 3, "cost_paper": total, "cost_sbm8": total,
              "mean_model_cp": 18.75, "mean_steer_cp": None, "wall_s": 3725.0} if finished else None)
  return make_workdir(root, name, method="static", model=model, bits=bits, lines=lines, summary=summary)


def frac(root: Path, name: str = "frac_resnet38") -> Path:
  ratio = [[0.5, 0.2, 0.1, 0.1, 0.1]] * 3
  lines = [_line(s, target_cp=t, steer_cp=t + 0.1, model_cp=t + 1.8, stage=st, choice_ratio=ratio,
                 candidates=CANDIDATES) for s, t, st in ((500, 1.5, 0), (1000, 2.0, 1))]
  summary = {"final_test_acc": 92.54, "best_test_acc": 92.61, "total_cost": 6.0e13, "cost_fw": 2e13,
             "cost_eb": 2e13, "cost_gc": 2e13, "cost_paper": 3.97e13, "cost_fp32": 1.92e15,
             "cost_sbm8": 1.2e14, "mean_model_cp": 3.55, "mean_steer_cp": 1.83,
             "turning_points": [780, 1560], "wall_s": 59.4}
  return make_workdir(root, name, method="frac", lines=lines, summary=summary)


def unfinished(root: Path, name: str = "frac_running", raw_tail: str = "") -> Path:
  # Intervals of 100, 200 and 100 iterations; the stage rises after step 300.
  ratio_a = [[1.0, 0.0], [0.0, 1.0]]
  ratio_b = [[0.0, 1.0], [0.5, 0.5]]
  lines = [_line(100, steer_cp=2.0, model_cp=4.0, test_acc=40.0, stage=0, target_cp=1.5,
                 choice_ratio=ratio_a, candidates=[[3, 4], [6, 8]]),
           _line(300, steer_cp=3.0, model_cp=5.0, test_acc=55.0, stage=0, target_cp=1.5,
                 choice_ratio=ratio_b, candidates=[[3, 4], [6, 8]]),
           _line(400, steer_cp=5.0, model_cp=7.0, test_acc=50.0, stage=1, target_cp=2.0, cost=7.5e12,
                 cost_paper=5.0e12, wall_s=321.0, choice_ratio=ratio_a, candidates=[[3, 4], [6, 8]])]
  return make_workdir(root, name, method="frac", lines=lines, raw_tail=raw_tail)


def table_rows(text: str) -> dict[str, dict[str, str]]:
  """Parse the Markdown table into {run name: {column: cell}}."""
  rows = [ln for ln in text.splitlines() if ln.startswith("|")]
  header = [c.strip() for c in rows[0].strip("|").split("|")]
  out = {}
  for ln in rows[2:]:
    cells = [c.strip() for c in ln.strip("|").split("|")]
    out[cells[0]] = dict(zip(header, cells))
  return out


def test_sci_three_significant_digits() -> None:
  assert report.sci(1.18e14) == "1.18e14"
  assert report.sci(3.97e13) == "3.97e13"
  assert report.sci(9.999e13) == "1.00e14"  # rounding carries into the exponent
  assert report.sci(None) == "n/a"


def test_table_numbers_equal_inputs(tmp_path: Path) -> None:
  runs = [report.load_run(sbm(tmp_path)), report.load_run(frac(tmp_path))]
  rows = table_rows(report.markdown_table(runs))
  s, f = rows["sbm_resnet38"], rows["frac_resnet38"]
  assert (s["method"], s["model"], s["status"]) == ("static", "resnet38", "done")
  assert (s["final acc (%)"], s["best acc (%)"]) == ("92.66", "92.80")
  assert (f["final acc (%)"], f["best acc (%)"]) == ("92.54", "92.61")
  assert (s["whole-model cost (MACs)"], f["whole-model cost (MACs)"]) == ("1.18e14", "6.00e13")
  assert (s["paper-convention cost (MACs)"], f["paper-convention cost (MACs)"]) == ("1.18e14", "3.97e13")
  # Paper's ResNet-38 CIFAR-10 pair: 3.97e13 / 1.18e14 = 33.64...%
  assert abs(3.97e13 / 1.18e14 * 100 - 33.64) < 0.01
  assert f["paper vs 8-bit"] == "33.6%"
  assert f["vs 8-bit"] == f"{100 * 6.0e13 / 1.18e14:.3g}%"
  assert s["vs 8-bit"] == s["paper vs 8-bit"] == "100%"
  assert (s["steering cp (%)"], f["steering cp (%)"]) == ("-", "1.83 (target 1.5 -> 2)")
  assert (s["whole-model cp (%)"], f["whole-model cp (%)"]) == ("18.75", "3.55")
  assert (s["turning points"], f["turning points"]) == ("-", "780, 1560")
  assert s["wall"] == "1:02:05"  # 3725 s
  assert f["wall"] == "0:00:59"


def test_baseline_explicit_wins(tmp_path: Path) -> None:
  runs = [report.load_run(sbm(tmp_path)), report.load_run(frac(tmp_path))]
  other = report.load_run(sbm(tmp_path / "elsewhere", name="sbm_other", total=1.0e14))
  text = report.markdown_table(runs, baseline=other)
  rows = table_rows(text)
  assert rows["frac_resnet38"]["paper vs 8-bit"] == "39.7%"  # 3.97e13 / 1.0e14
  assert rows["sbm_resnet38"]["vs 8-bit"] == "118%"
  assert "given with --baseline" in text and "sbm_other" in text


def test_baseline_picks_static8_of_same_model(tmp_path: Path) -> None:
  runs = [report.load_run(p) for p in (
      sbm(tmp_path, "static4", bits=(4, 4), total=3.0e13),          # wrong bits
      sbm(tmp_path, "sbm74", model="resnet74", total=2.62e14),      # wrong model
      sbm(tmp_path, "sbm_running", total=5.0e13, finished=False),   # has not paid its whole cost
      sbm(tmp_path, "sbm38", total=1.18e14),
      frac(tmp_path))]
  text = report.markdown_table(runs)
  rows = table_rows(text)
  assert rows["frac_resnet38"]["paper vs 8-bit"] == f"{100 * 3.97e13 / 1.18e14:.3g}%"
  assert "`frac_resnet38`" in text.split("relative to run `sbm38`")[0].splitlines()[-1]
  # The resnet74 run is its own baseline: 100%.
  assert rows["sbm74"]["vs 8-bit"] == "100%"


def test_baseline_falls_back_to_own_sbm8(tmp_path: Path) -> None:
  text = report.markdown_table([report.load_run(frac(tmp_path))])
  row = table_rows(text)["frac_resnet38"]
  assert row["vs 8-bit"] == "50%"  # 6.0e13 / 1.2e14
  assert row["paper vs 8-bit"] == "33.1%"  # 3.97e13 / (1.92e15 / 16)
  assert "its own `cost_sbm8`" in text


def test_unfinished_run_derived_from_metrics(tmp_path: Path) -> None:
  wd = unfinished(tmp_path, raw_tail='{"step": 500, "steer_cp": 4.')  # killed mid-write
  run = report.load_run(wd)
  assert not run.finished
  assert run.last_step == 400 and run.iters == 1000
  assert (run.final_test_acc, run.best_test_acc) == (50.0, 55.0)
  assert run.total_cost == 7.5e12 and run.wall_s == 321.0
  assert run.mean_steer_cp == pytest.approx((2.0 * 100 + 3.0 * 200 + 5.0 * 100) / 400)
  assert run.mean_model_cp == pytest.approx((4.0 * 100 + 5.0 * 200 + 7.0 * 100) / 400)
  assert run.turning_points == [300]
  rows = table_rows(report.markdown_table([run, report.load_run(sbm(tmp_path))]))
  row = rows["frac_running"]
  assert row["status"] == "unfinished (step 400/1000)"
  assert row["vs 8-bit"] == f"{100 * 7.5e12 / 1.18e14:.3g}%"
  assert row["steering cp (%)"] == "3.25 (target 1.5 -> 2)"
  # Alone, with no summary and no 8-bit run, there is nothing to compare with.
  alone = report.markdown_table([run])
  assert table_rows(alone)["frac_running"]["vs 8-bit"] == "n/a"
  assert "Unfinished" in alone


def test_choice_shares_weighted_by_interval(tmp_path: Path) -> None:
  shares = report.choice_shares(report.load_run(unfinished(tmp_path)))
  # Weights 100, 200, 100 over ratios a, b, a.
  expected = [[200 / 400, 200 / 400], [100 / 400, 300 / 400]]
  assert [len(b) for b in shares] == [2, 2]
  assert sum(shares, []) == pytest.approx(sum(expected, []))


def test_plots_are_png_files(tmp_path: Path) -> None:
  runs = [report.load_run(p) for p in (sbm(tmp_path), frac(tmp_path), unfinished(tmp_path))]
  out = tmp_path / "figs"
  paths = report.plot_all(runs, out)
  assert {p.name for p in paths} == {
      "acc_vs_cost.png", "precision_sbm_resnet38.png", "precision_frac_resnet38.png",
      "precision_frac_running.png", "choices_frac_resnet38.png", "choices_frac_running.png"}
  for p in paths:
    data = p.read_bytes()
    assert p.parent == out and data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def lm(root: Path, name: str = "sbm_lm", ppl: float = 300.0) -> Path:
  """An LM run: token accuracy beside its perplexity, as train.py writes them."""
  lines = [_line(s, test_acc=9.0, test_loss=math.log(ppl), test_ppl=ppl, fw_bits=8, bw_bits=8)
           for s in (500, 1000)]
  summary = {"final_test_acc": 9.0, "best_test_acc": 9.0, "final_test_ppl": ppl,
             "best_test_ppl": ppl, "total_cost": 1e12, "cost_paper": 1e12, "wall_s": 60.0}
  return make_workdir(root, name, method="static", model="transformer_lm", bits=(8, 8),
                      lines=lines, summary=summary)


def test_lm_and_image_runs_each_show_their_measure_and_never_share_a_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  runs = [report.load_run(p) for p in (sbm(tmp_path), lm(tmp_path), frac(tmp_path))]
  text = report.markdown_table(runs)
  images, lms = text.split("### ")[1:]
  assert images.startswith("Image classification") and lms.startswith("Language model")
  assert set(table_rows(images)) == {"sbm_resnet38", "frac_resnet38"}
  assert table_rows(images)["sbm_resnet38"]["final acc (%)"] == "92.66"
  (row,) = table_rows(lms).values()
  assert row["run"] == "sbm_lm" and row["final test ppl"] == "300.00" and "final acc (%)" not in row
  drawn = []
  real = report_plots.plot_acc_vs_cost

  def spy(runs, names, path, **kwargs):
    drawn.append((path.name, sorted(names)))
    return real(runs, names, path, **kwargs)

  monkeypatch.setattr(report_plots, "plot_acc_vs_cost", spy)
  report.plot_all(runs, tmp_path / "figs")
  assert drawn == [("acc_vs_cost.png", ["frac_resnet38", "sbm_resnet38"]),
                   ("ppl_vs_cost.png", ["sbm_lm"])]


def test_main_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
  a, b = sbm(tmp_path / "runs"), frac(tmp_path / "runs")
  out = tmp_path / "out"
  assert report.main([str(a), str(b), "--out", str(out), "--baseline", str(a)]) == 0
  md = (out / "report.md").read_text()
  assert table_rows(md)["frac_resnet38"]["paper vs 8-bit"] == "33.6%"
  assert "(acc_vs_cost.png)" in md and (out / "acc_vs_cost.png").is_file()
  assert "| frac_resnet38 |" in capsys.readouterr().out


def test_cli_subprocess_default_out(tmp_path: Path) -> None:
  a, b = sbm(tmp_path / "runs"), unfinished(tmp_path / "runs")
  proc = subprocess.run([sys.executable, "-m", "fractrain_jax.report", str(a), str(b), "--no-plots"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "unfinished (step 400/1000)" in proc.stdout
  # Default output folder: report/ beside the first workdir.
  assert (tmp_path / "runs" / "report" / "report.md").is_file()
  # A second `report runs/*` names that output folder too: it is skipped, not an error.
  workdirs = sorted(str(p) for p in (tmp_path / "runs").iterdir())
  assert report.main([*workdirs, "--no-plots"]) == 0


def test_missing_metrics_names_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
  empty = tmp_path / "not_a_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="not_a_run"):
    report.load_run(empty)
  assert report.main([str(empty), "--no-plots", "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert f"warning: skipping {empty}" in err and str(empty / "metrics.jsonl") in err
  assert "none of the workdirs has metrics yet" in err


def test_a_workdir_without_metrics_is_skipped_not_fatal(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
  started = tmp_path / "runs" / "just_started"
  started.mkdir(parents=True)
  done = frac(tmp_path / "runs")
  assert report.main([str(started), str(done), "--no-plots", "--out", str(tmp_path / "o")]) == 0
  captured = capsys.readouterr()
  assert f"warning: skipping {started}" in captured.err
  assert "| frac_resnet38 |" in captured.out and "just_started" not in captured.out


def test_axes_ticks_are_readable(tmp_path: Path) -> None:
  """Log-axis labels only at powers of ten; the bits axis has integer ticks only."""
  pfq_lines = [_line(s, fw_bits=fw, bw_bits=bw, cost=c)
               for s, fw, bw, c in ((100, 3, 4, 3e11), (200, 4, 4, 2e12), (300, 4, 4, 9e13))]
  run = report.load_run(make_workdir(tmp_path, "pfq", method="pfq", lines=pfq_lines))
  from matplotlib.figure import Figure  # the same object API the module uses
  fig = Figure()
  ax = fig.add_subplot()
  ax.plot([3e11, 9e13], [1, 2])
  ax.set_xscale("log")
  report_plots._log_axis(ax.xaxis)
  fig.canvas.draw()
  shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
  assert shown and all(re.fullmatch(r"1e\d+", t) for t in shown), shown
  top = report.precision_figure(run, "pfq").axes[0]
  top.figure.canvas.draw()
  ticks = [t for t in top.get_yticks() if 3 <= t <= 4]
  assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_report_never_imports_jax() -> None:
  proc = subprocess.run([sys.executable, "-c", "import sys, fractrain_jax.report; "
                         "assert 'jax' not in sys.modules, 'jax imported'"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
