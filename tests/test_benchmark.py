"""The benchmark CLI's output contract (speed itself is never asserted in tests)."""

import contextlib
import io
import json

import numpy as np
import pytest

from fractrain_jax import benchmark, cost
from fractrain_jax.onednn import library


def run_json(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert benchmark.main(argv + ["--json", "--no-cpu-flags"]) == 0
  return [json.loads(line) for line in out.getvalue().splitlines()]


def test_step_prints_one_row_per_method_with_ratios_to_fp32():
  methods = ["fp32", "static", "dfq"]
  rows = run_json(["step", "--model", "resnet8", "--batch-size", "4", "--repeats", "2",
                   "--methods", *methods])
  assert [r["method"] for r in rows] == methods
  fp32_ms = rows[0]["step_ms"]
  for r in rows:
    assert r["model"] == "resnet8" and r["batch_size"] == 4 and r["repeats"] == 2
    assert 0 < r["min_step_ms"] <= r["step_ms"]
    assert r["images_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))
    assert r["ratio_to_fp32"] == pytest.approx(r["step_ms"] / fp32_ms)
    # Each round's step, and its quartiles of ratios to the same round's FP32 step.
    assert len(r["round_ms"]) == 2 and np.median(r["round_ms"]) == pytest.approx(r["step_ms"])
    per_round = np.asarray(r["round_ms"]) / np.asarray(rows[0]["round_ms"])
    q1, median, q3 = np.percentile(per_round, [25, 50, 75])
    assert r["round_ratio_to_fp32"] == pytest.approx({"q1": q1, "median": median, "q3": q3})
  assert rows[0]["ratio_to_fp32"] == 1.0
  assert rows[0]["round_ratio_to_fp32"] == {"q1": 1.0, "median": 1.0, "q3": 1.0}


def test_round_ratios_are_quartiles_of_each_rounds_ratio():
  times, base = [2.0, 3.0, 9.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]
  # Ratios 2, 1.5, 3, 1, 1: sorted 1, 1, 1.5, 2, 3.
  assert benchmark.round_ratios(times, base) == pytest.approx({"q1": 1.0, "median": 1.5,
                                                               "q3": 2.0})
  assert benchmark.round_ratios([3.0], [2.0]) == {"q1": 1.5, "median": 1.5, "q3": 1.5}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_each_method_takes_every_place_in_the_rounds_once(n):
  keys = [f"m{i}" for i in range(n)]
  places = {k: [] for k in keys}
  for r in range(n):
    order = benchmark.turn_order(keys, r)
    assert sorted(order) == keys  # Each method once a round.
    for place, k in enumerate(order):
      places[k].append(place)
  assert all(sorted(p) == list(range(n)) for p in places.values())
  assert benchmark.turn_order(keys, 0) == keys  # The first round in the order asked for.


def test_per_candidate_variant_runs_dfq_with_the_authors_block_forward():
  runner = benchmark.StepRunner.create("dfq_per_candidate", model_name="resnet8",
                                       batch_size=2, num_classes=10)
  assert runner.trainer.method.name == "dfq"
  assert runner.trainer.config.dfq.forward == "per_candidate"
  # Only the per-candidate forward quantizes (and charges) shortcuts at the block's choice.
  assert any(l.kind == "gated" and "shortcut" in l.name for l in runner.trainer.layers)


def test_unknown_step_method_is_refused(capsys):
  with pytest.raises(SystemExit):
    benchmark.main(["step", "--methods", "dfq_twice"])
  assert "dfq_per_candidate" in capsys.readouterr().err


def test_quant_compares_each_quantized_conv_with_fp32():
  rows = run_json(["quant", "--batch-size", "2", "--repeats", "2"])
  assert [r["variant"] for r in rows] == ["fp32", "quantized_8_8", "quantized_4_6"]
  for r in rows:
    assert r["kernels"] == "xla" and r["ratio_to_fp32"] == pytest.approx(r["ms"] / rows[0]["ms"])


@pytest.mark.skipif(not library.status().ok, reason=library.status().reason)
def test_quant_times_each_kind_of_kernels_against_its_own_fp32():
  rows = run_json(["quant", "--batch-size", "2", "--repeats", "1", "--kernels", "xla", "onednn"])
  assert [(r["kernels"], r["variant"]) for r in rows] == [
      (k, v) for k in ("xla", "onednn") for v in ("fp32", "quantized_8_8", "quantized_4_6")]
  for r in rows:
    base = next(b for b in rows if b["kernels"] == r["kernels"] and b["variant"] == "fp32")
    assert r["ratio_to_fp32"] == pytest.approx(r["ms"] / base["ms"])


def test_lm_step_times_the_gated_lm_with_the_lm_recipes_candidates():
  rows = run_json(["step", "--model", "transformer_lm", "--batch-size", "2", "--repeats", "1",
                   "--num-classes", "50", "--methods", "fp32", "dfq", "frac"])
  assert [r["method"] for r in rows] == ["fp32", "dfq", "frac"]
  runner = benchmark.StepRunner.create("dfq", model_name="transformer_lm", batch_size=2,
                                       num_classes=50)
  assert runner.trainer.config.dfq.fw_candidates == (4, 6, 8)
  # The middle of the candidates' reachable range (the recipes' 4.8, to 0.02).
  assert runner.trainer.config.dfq.target_cp == pytest.approx(
      sum(cost.steer_cp_range((4, 6, 8), (6, 8, 8), 8)) / 2)
  # Every quantized matmul is charged to its sublayer's per-token choice.
  assert {l.block for l in runner.trainer.layers if l.kind == "gated"} == {0, 1, 2, 3}


def test_lm_step_refuses_the_per_candidate_variants(capsys):
  with pytest.raises(SystemExit):
    benchmark.main(["step", "--model", "transformer_lm", "--methods", "dfq_per_candidate"])
  assert "runs 'single' only" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["step", "--model", "resnet999"], "--model='resnet999'; expected one of resnet8"),
    (["step", "--batch-size", "0"], "--batch-size=0; expected an int >= 1"),
    (["quant", "--repeats", "0"], "--repeats=0; expected an int >= 1"),
])
def test_bad_arguments_are_one_line(capsys, argv, needle):
  with pytest.raises(SystemExit) as info:
    benchmark.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert needle in err and "Traceback" not in err


def test_step_times_a_model_of_your_own_beside_the_zoo_model():
  rows = run_json(["step", "--model", "resnet8", "examples.user_models:resnet",
                   "--options", "{'depth': 8}", "--blocks", r"blocks/\d+", "--quantize", "fp:fc",
                   "q:.*", "--batch-size", "2", "--repeats", "1", "--methods", "static"])
  assert [(r["model"], r["method"]) for r in rows] == [
      ("resnet8", "static"), ("examples.user_models:resnet", "static")]
  assert rows[1]["ratio_to_first_model"] == pytest.approx(rows[1]["step_ms"] / rows[0]["step_ms"])
  assert rows[0]["ratio_to_first_model"] == 1.0
  # Its gated model is the attached one, with the blocks and rules given.
  runner = benchmark.StepRunner.create(
      "dfq", model_name="examples.user_models:resnet", batch_size=2, num_classes=10,
      own=benchmark.OwnModel({"depth": 8}, (r"blocks/\d+",), ("fp:fc", "q:.*"), (32, 32, 3)))
  assert {l.block for l in runner.trainer.layers if l.kind == "gated"} == {0, 1, 2}


def test_a_model_of_your_own_without_blocks_times_the_plain_methods_only():
  args = ["step", "--model", "examples.user_models:resnet", "--options", "{'depth': 8}"]
  with pytest.raises(SystemExit) as info:
    benchmark.main(args + ["--methods", "dfq"])
  assert info.value.code == 2
  runner = benchmark.StepRunner.create(
      "pfq", model_name="examples.user_models:resnet", batch_size=2, num_classes=10,
      own=benchmark.OwnModel({"depth": 8}, (), (), (32, 32, 3)))
  assert {l.kind for l in runner.trainer.layers} == {"static", "fp"}


def test_peer_table_gives_medians_of_rounds_and_the_ratios(tmp_path):
  from fractrain_jax.benchmark import peers

  rows = [{"system": "plain PyTorch 2.13.0, channels_last", "method": "fp32", "step_ms": v}
          for v in (400.0, 420.0, 380.0)]
  rows += [{"system": "the authors' FracTrain code (PyTorch 2.13.0)", "method": m, "step_ms": v}
           for m, v in (("fp32", 500.0), ("pfq", 750.0))]
  rows += [{"bench": "step", "model": "resnet38", "method": m, "step_ms": v}
           for m, v in (("fp32", 600.0), ("pfq", 630.0), ("fp32_xla", 900.0))]
  path = tmp_path / "peers.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\nround 2 of 2\n")
  assert peers.main([str(path)]) == 0
  text = peers.table(peers.read(path.read_text().splitlines()))
  lines = text.splitlines()
  assert "| plain PyTorch 2.13.0, channels_last | 400.0 ms |" in text  # median of 3 rounds
  assert "| the authors' FracTrain code (PyTorch 2.13.0) | 500.0 ms |  | 750.0 ms (1.50x) |" in text
  assert any(l.startswith("| fractrain-jax (resnet38) | 600.0 ms |  | 630.0 ms (1.05x) |")
             for l in lines)
  assert "| fractrain-jax (resnet38), XLA's kernels | 900.0 ms |" in text
  assert "plain PyTorch channels-last FP32: 1.50x" in text  # 600 / 400, not 900 / 400
  assert "the authors' PFQ: 0.84x" in text  # 630 / 750


def test_peer_table_refuses_a_file_without_timings(tmp_path, capsys):
  from fractrain_jax.benchmark import peers

  path = tmp_path / "empty.jsonl"
  path.write_text("round 1 of 2\n")
  with pytest.raises(SystemExit) as err:
    peers.main([str(path)])
  assert err.value.code == 2
  assert "no step timings" in capsys.readouterr().err


def test_profile_splits_a_step_into_op_classes(capsys):
  assert benchmark.main(["profile", "--model", "resnet8", "--methods", "fp32", "static",
                         "--batch-size", "16", "--steps", "1", "--json"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  by_method = {m: {r["op_class"]: r for r in rows if r["method"] == m} for m in ("fp32", "static")}
  for classes in by_method.values():
    # Every conv of the step lands in one of its three passes.
    assert {"conv forward", "conv input-grad", "conv weight-grad"} <= set(classes)
    assert abs(sum(r["share"] for r in classes.values()) - 1) < 1e-6
  assert "quantizers" in by_method["static"] and "quantizers" not in by_method["fp32"]


def test_profile_takes_a_model_of_your_own(capsys):
  assert benchmark.main(["profile", "--model", "examples.user_models:resnet", "--options",
                         "{'depth': 8}", "--methods", "fp32", "--batch-size", "4", "--steps", "1",
                         "--json"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert {r["model"] for r in rows} == {"examples.user_models:resnet"}
  assert {"conv forward", "conv weight-grad"} <= {r["op_class"] for r in rows}


def test_an_asynchronous_instruction_runs_until_its_end_event():
  """XLA:CPU's own convs are launched and finish later ("end: NAME"): their time
  is launch to finish; a synchronous one's is its event's duration; time when
  both run is shared."""
  from fractrain_jax.benchmark import profile

  def ev(name, ts, dur):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur}

  events = [ev("convolution.1", 0.0, 2.0), ev("fusion.3", 3.0, 5.0), ev("end: convolution.1", 40.0, 1.0),
            ev("convolution.1", 100.0, 2.0),  # This run finished synchronously: no end event
            ev("convolution.1", 200.0, 2.0), ev("end: convolution.1", 230.0, 0.5),
            ev("fusion.3", 300.0, 4.0), {"ph": "M", "name": "fusion.3"},
            ev("end: unknown.7", 50.0, 1.0)]
  names = {"convolution.1", "fusion.3"}
  assert sorted(profile.instruction_intervals(events, names)) == [
      (0.0, 41.0, "convolution.1"), (3.0, 8.0, "fusion.3"), (100.0, 102.0, "convolution.1"),
      (200.0, 230.5, "convolution.1"), (300.0, 304.0, "fusion.3")]
  # From 3 to 8 both run: 2.5 each. The times add up to the union of the intervals.
  times = profile.instruction_times(events, names)
  assert times == pytest.approx({"convolution.1": 3 + 2.5 + 33 + 2 + 30.5, "fusion.3": 2.5 + 4})
  assert sum(times.values()) == pytest.approx(41 + 2 + 30.5 + 4)


def test_an_instant_beside_a_kernel_that_takes_every_core_is_the_kernels():
  """A fusion that runs beside an FFI kernel waits for the cores its OpenMP threads
  hold: the instants they share are the kernel's (shared among such kernels)."""
  from fractrain_jax.benchmark import profile

  def ev(name, ts, dur):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur}

  # ffi_call.1 runs 0-10, ffi_call.2 6-12, fusion.3 2-16: alone from 12 to 16.
  events = [ev("ffi_call.1", 0.0, 10.0), ev("ffi_call.2", 6.0, 6.0), ev("fusion.3", 2.0, 14.0)]
  names = {"ffi_call.1", "ffi_call.2", "fusion.3"}
  times = profile.instruction_times(events, names, all_cores={"ffi_call.1", "ffi_call.2"})
  assert times == pytest.approx({"ffi_call.1": 6 + 2, "ffi_call.2": 2 + 2, "fusion.3": 4})
  assert sum(times.values()) == pytest.approx(16)
  # Without kernels that take every core, every instant is shared evenly.
  even = profile.instruction_times(events, names)
  assert even == pytest.approx({"ffi_call.1": 2 + 2 + 4 / 3, "ffi_call.2": 4 / 3 + 1,
                                "fusion.3": 2 + 4 / 3 + 1 + 4})


def test_profile_classes_the_onednn_calls_by_pass():
  """Each oneDNN kernel's FFI call is its op class, a tuple-shaped one (BN's forward
  returns y, mean and variance) included."""
  from fractrain_jax.benchmark import profile
  from fractrain_jax.onednn import library

  assert set(profile.KERNEL_CLASSES) == set(library.TARGETS)
  text = """HloModule m

ENTRY %main.1 (a: f32[2,4,4,3], b: f32[3,3,3,8], c: f32[8]) -> f32[3,3,3,8] {
  %a = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %b = f32[3,3,3,8]{3,2,1,0} parameter(1)
  %c = f32[8]{0} parameter(2)
  %ffi_call.1 = f32[2,4,4,8]{3,2,1,0} custom-call(%a, %b), custom_call_target="FractrainOneDnnConvForward"
  %ffi_call.2 = (f32[2,4,4,8]{3,2,1,0}, f32[8]{0}, f32[8]{0}) custom-call(%ffi_call.1, %c, %c), custom_call_target="FractrainOneDnnBatchNormForward"
  %ffi_call.3 = f32[2,4,4,3]{3,2,1,0} custom-call(%ffi_call.1, %b), custom_call_target="FractrainOneDnnConvInputGrad"
  %other = f32[2,4,4,8]{3,2,1,0} custom-call(%ffi_call.1), custom_call_target="SomethingElse"
  ROOT %ffi_call.4 = f32[3,3,3,8]{3,2,1,0} custom-call(%a, %ffi_call.1), custom_call_target="FractrainOneDnnConvWeightGrad"
}
"""
  index = profile.HloIndex(text)
  assert index.kernel_calls() == {"ffi_call.1", "ffi_call.2", "ffi_call.3", "ffi_call.4"}
  assert {n: index.classify(n) for n in ("ffi_call.1", "ffi_call.2", "ffi_call.3", "ffi_call.4",
                                         "other")} == {
      "ffi_call.1": "conv forward", "ffi_call.2": "BN", "ffi_call.3": "conv input-grad",
      "ffi_call.4": "conv weight-grad", "other": profile.OTHER}
