"""Where one train step spends its time, by op class: ``python -m fractrain_jax.benchmark profile``.

A ``jax.profiler`` trace of a few steps (after warm-up) gives each executed
HLO instruction's time; the compiled module's text gives what each one is:
its ops, and the source lines it came from (the stack frames XLA keeps in
the metadata). Classes, first match wins:

  conv forward / conv input-grad / conv weight-grad (and BN): a call of one of the
    oneDNN kernels (``fractrain_jax/onednn``, one per pass), or an instruction holding
    a convolution (the weight gradient is the conv whose window is larger than
    its output image; the input gradient one traced under ``transpose``);
  transpose/copy: layout changes (most feed the convs);
  quantizers, gate, data augmentation, cost and DFQ loss, optimizer, BN: by
    the innermost source line of the project that the instruction came from
    (its file, or for the optimizer and BN the line's text: JAX keeps no
    frames inside Flax or optax);
  other element-wise: the rest (ReLU, residual adds, the loss).

Times are the instructions' durations per step, an asynchronous one (XLA:CPU's
own convolutions) from its launch to its ``end:`` event; where executions
overlap (on several threads, or an asynchronous one beside others) each
instant is shared evenly among them, so the classes add up to the time the
step kept the CPU busy. An instant in which one of the project's FFI kernels
runs (``KERNEL_CLASSES``) goes to the kernels alone: their OpenMP threads
hold every core, and an XLA fusion launched beside one waits for the cores
(on 2 cores a ReLU backward took 0.3-0.5 ms alone and 19-30 ms beside a
conv, its interval wholly inside the conv's: docs/RESULTS.md, "Eighth
step"). Shared evenly, such waits made FP32's ReLU backward look like a
sixth of its step.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import linecache
import os
import re
import tempfile

# Innermost source file (a path suffix) -> class; the first that a frame matches.
FILE_CLASSES = (("fractrain_jax/quant.py", "quantizers"),
                ("fractrain_jax/models/gate.py", "gate"),
                ("fractrain_jax/optim.py", "optimizer"),
                ("fractrain_jax/data/augment.py", "data augmentation"),
                ("fractrain_jax/cost.py", "cost and DFQ loss"),
                ("fractrain_jax/dfq.py", "cost and DFQ loss"),
                ("fractrain_jax/norm.py", "BN"))
# A source line's text -> class, for frames whose file says nothing more.
LINE_CLASSES = ((re.compile(r"tx\.update|apply_updates|global_norm"), "optimizer"),
                (re.compile(r"\bbn\w*\(|\bnorm\w*\(|BatchNorm"), "BN"))
OTHER = "other element-wise"
# The oneDNN kernels' FFI targets (fractrain_jax/onednn/library.py) -> class.
KERNEL_CLASSES = {"FractrainOneDnnConvForward": "conv forward",
                  "FractrainOneDnnConvInputGrad": "conv input-grad",
                  "FractrainOneDnnConvWeightGrad": "conv weight-grad",
                  "FractrainOneDnnBatchNormForward": "BN",
                  "FractrainOneDnnBatchNormBackward": "BN",
                  "FractrainOneDnnBatchNormReluForward": "BN",
                  "FractrainOneDnnBatchNormReluBackward": "BN",
                  "FractrainQuantize": "quantizers",
                  "FractrainBlendGrad": "quantizers"}
_TARGET = re.compile(r'custom_call_target="(\w+)"')

# The shape may be a tuple, "(f32[8]{0}, f32[2]{0})" (a multi-output fusion or FFI call).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


@dataclasses.dataclass
class Instruction:
  op: str
  line: str
  calls: str | None
  frame: int | None
  op_name: str


def _kernel_target(inst: Instruction) -> str | None:
  """The FFI target ``inst`` calls, if it is one of the project's kernels (``KERNEL_CLASSES``)."""
  target = _TARGET.search(inst.line) if inst.op == "custom-call" else None
  return target.group(1) if target and target.group(1) in KERNEL_CLASSES else None


class HloIndex:
  """The instructions of a compiled module's text, and the source files of each one."""

  def __init__(self, text: str):
    self.instructions: dict[str, Instruction] = {}
    self.computations: dict[str, list[str]] = {}
    self.files: dict[int, str] = {}
    self.locations: dict[int, tuple[int, int]] = {}  # file location -> (file, line)
    self.frames: dict[int, tuple[int, int]] = {}  # frame -> (file location, parent frame)
    section, current = None, None
    for line in text.splitlines():
      if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        section = line
        continue
      if section and line and line[0].isdigit():
        self._read_table(section, line)
        continue
      section = None
      m = _COMPUTATION.match(line)
      if m and "=" not in line.split("{")[0]:
        current = m.group(1)
        self.computations[current] = []
        continue
      m = _INSTRUCTION.match(line)
      if m and current:
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        self.instructions[m.group(1)] = Instruction(
            m.group(3), line, calls.group(1) if calls else None,
            int(frame.group(1)) if frame else None, op_name.group(1) if op_name else "")
        self.computations[current].append(m.group(1))

  def _read_table(self, section: str, line: str) -> None:
    key, _, rest = line.partition(" ")
    if section == "FileNames":
      self.files[int(key)] = rest.strip().strip('"')
    elif section == "FileLocations":
      self.locations[int(key)] = (int(re.search(r"file_name_id=(\d+)", rest).group(1)),
                                  int(re.search(r"\bline=(\d+)", rest).group(1)))
    elif section == "StackFrames":
      loc = int(re.search(r"file_location_id=(\d+)", rest).group(1))
      parent = int(re.search(r"parent_frame_id=(\d+)", rest).group(1))
      self.frames[int(key)] = (loc, parent)

  def source_lines(self, frame: int | None) -> list[tuple[str, int]]:
    """The (file, line) of a stack frame's chain, innermost first."""
    lines, seen = [], set()
    while frame and frame in self.frames and frame not in seen:
      seen.add(frame)
      loc, parent = self.frames[frame]
      file_id, line = self.locations.get(loc, (-1, 0))
      lines.append((self.files.get(file_id, ""), line))
      frame = parent
    return lines

  def members(self, name: str) -> list[Instruction]:
    """An instruction, or the instructions of the computation it calls (a fusion)."""
    inst = self.instructions[name]
    if inst.calls in self.computations:
      return [self.instructions[n] for n in self.computations[inst.calls]]
    return [inst]

  def kernel_calls(self) -> set[str]:
    """The instructions that call one of the project's FFI kernels (``KERNEL_CLASSES``)."""
    return {n for n, inst in self.instructions.items() if _kernel_target(inst)}

  def classify(self, name: str) -> str:
    inst = self.instructions[name]
    members = self.members(name)
    for member in members:
      target = _kernel_target(member)
      if target:
        return KERNEL_CLASSES[target]
    conv = next((m for m in members if m.op == "convolution"), None)
    if conv is not None:
      window = re.search(r"window=\{size=([\dx]+)", conv.line)
      out = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \w+\[([\d,]+)\]", conv.line)
      if window and out:
        spatial = [int(d) for d in out.group(1).split(",")[1:-1]]
        if max(int(d) for d in window.group(1).split("x")) > max(spatial or [0]):
          return "conv weight-grad"
      backward = "transpose(" in conv.op_name or "transpose(" in inst.op_name
      return "conv input-grad" if backward else "conv forward"
    if {m.op for m in members} & {"transpose", "copy"} and all(
        m.op in ("transpose", "copy", "parameter", "bitcast", "slice") for m in members):
      return "transpose/copy"
    for member in [inst] + members:
      for path, line in self.source_lines(member.frame):
        for suffix, label in FILE_CLASSES:
          if path.endswith(suffix):
            return label
        text = linecache.getline(path, line)
        for pattern, label in LINE_CLASSES:
          if pattern.search(text):
            return label
    return OTHER


def step_profile(runner, *, steps: int = 3, trace_dir: str | None = None) -> dict[str, float]:
  """ms per step of each op class over ``steps`` profiled steps of a ``speed.StepRunner``."""
  import jax  # pylint: disable=import-outside-toplevel

  fn = runner.trainer.train_step(runner.precision)
  index = HloIndex(fn.lower(runner.state, runner.batch, runner.target_cp, runner.tau)
                   .compile().as_text())
  for _ in range(2):
    jax.block_until_ready(runner.step())
  with tempfile.TemporaryDirectory(dir=trace_dir) as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    try:
      for _ in range(steps):
        jax.block_until_ready(runner.step())
    finally:
      jax.profiler.stop_trace()
    traces = glob.glob(os.path.join(folder, "plugins", "profile", "*", "*.trace.json.gz"))
    if not traces:
      raise RuntimeError(f"jax.profiler wrote no trace under {folder}")
    with gzip.open(traces[0]) as f:
      events = json.load(f)["traceEvents"]
  totals: dict[str, float] = collections.Counter()
  for name, us in instruction_times(events, index.instructions,
                                    all_cores=index.kernel_calls()).items():
    totals[index.classify(name)] += us / 1e3 / steps
  return dict(totals)


def instruction_intervals(events: list[dict], names) -> list[tuple[float, float, str]]:
  """(start, end, name) in microseconds of each execution of an instruction in ``names``.

  XLA:CPU runs some thunks (its own convolutions) asynchronously: the event
  named for the instruction covers only its launch, and an event ``end: NAME``
  marks when it finished. Such an execution runs from its launch to the end of
  the first ``end:`` event after it (and before its next launch); the others
  last their event's duration.
  """
  starts: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  ends: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    if name.startswith("end: ") and name[5:] in names:
      ends[name[5:]].append(e["ts"] + e["dur"])
    elif name in names:
      starts[name].append((e["ts"], e["dur"]))
  intervals = []
  for name, runs in starts.items():
    finished = sorted(ends.get(name, ()))
    runs = sorted(runs)
    i = 0
    for k, (ts, dur) in enumerate(runs):
      end = ts + dur
      next_launch = runs[k + 1][0] if k + 1 < len(runs) else float("inf")
      while i < len(finished) and finished[i] < ts:
        i += 1
      if i < len(finished) and finished[i] < next_launch:  # Else it ended synchronously.
        end = max(end, finished[i])
        i += 1
      intervals.append((ts, end, name))
  return intervals


def instruction_times(events: list[dict], names, all_cores=frozenset()) -> dict[str, float]:
  """Microseconds of the trace each instruction in ``names`` had, summed over its executions.

  Asynchronous executions overlap one another and the synchronous ones (two
  convs of different layers in flight on two cores); each instant is shared
  evenly among the executions running then, or, where some of them are of an
  instruction in ``all_cores`` (a kernel that takes every core), among those
  alone. The times add up to the time anything ran, never more than the wall
  time.
  """
  intervals = instruction_intervals(events, names)
  bounds = []
  for k, (start, end, _) in enumerate(intervals):
    bounds += [(start, 1, k), (end, -1, k)]
  bounds.sort(key=lambda b: (b[0], b[1]))  # At one instant, ends before starts.
  times: dict[str, float] = collections.Counter()
  running: set[int] = set()
  last = None
  for t, kind, k in bounds:
    if running and t > last:
      holders = [r for r in running if intervals[r][2] in all_cores] or running
      share = (t - last) / len(holders)
      for r in holders:
        times[intervals[r][2]] += share
    last = t
    if kind > 0:
      running.add(k)
    else:
      running.discard(k)
  return dict(times)
