"""Several processes (JAX's multi-controller runtime) on this machine, over loopback.

Two ``main.py`` processes of two CPU devices each (gloo collectives) train one
run; it must equal one process of four devices, with every file written once.
A signal to one process stops both at one checkpointed step, which one
process resumes, and two processes resume that in turn. A process whose peers
never come says what it waits for and gives up in one line.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from fractrain_jax.run import files as run_files
from test_train import _image_folder, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(run_dir, folder, recipe, iters, *extra):
  return [sys.executable, "main.py", "--config", f"configs/{recipe}_cifar10.py",
          f"--config.data.dataset=folder:{folder}", "--config.model.name=resnet8",
          f"--config.train.iters={iters}", "--config.train.batch_size=8",
          "--config.train.eval_every=2", "--config.train.eval_batch_size=8",
          f"--workdir={run_dir}", *extra]


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
          "JAX_NUM_CPU_DEVICES": str(devices)}


# main.py with tfds's mock ImageNet (it patches the process it runs in): 64 examples,
# so that no second epoch's pipeline starts while the evaluation's runs.
MOCK_MAIN = ("import sys, runpy, tensorflow_datasets as tfds\n"
             "sys.argv = sys.argv[1:]\n"
             "with tfds.testing.mock_data(num_examples=64):\n"
             "  runpy.run_path('main.py', run_name='__main__')\n")


def _two(run_dir, folder, recipe, iters, *extra, mock=False):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = _cmd(run_dir, folder, recipe, iters, f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}", *extra)
    if mock:
      cmd[1:1] = ["-c", MOCK_MAIN]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _wait(procs, timeout=300):
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      results.append((p.returncode, out, err))
  finally:
    for p in procs:
      p.kill()
  return results


def _one(run_dir, folder, recipe, iters, *extra, devices=4, mock=False):
  cmd = _cmd(run_dir, folder, recipe, iters, *extra)
  if mock:
    cmd[1:1] = ["-c", MOCK_MAIN]
  done = subprocess.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _image_folder(tmp_path_factory.mktemp("images") / "f", per_class=4)


@pytest.mark.parametrize("recipe,rtol", [
    ("fp32", 1e-5),
    # Collectives sum in another order across processes; a quantization input that
    # lands on a rounding threshold moves by a whole step. One process on 1, 2 and 4
    # devices spreads this tiny run's DFQ test loss by 2% (0.682, 0.686, 0.674); the
    # train loss of its second interval (two steps of 8 images) was 0.712 in one process
    # and 0.737 in two (3.4%) with flax 0.12.8, optax 0.2.8 and numpy 2.4.6, at the
    # same cp and a test loss 1.1% apart.
    ("dfq", 5e-2),
])
def test_two_processes_train_the_one_process_run_and_write_each_file_once(
    tmp_path, folder, recipe, rtol):
  t0 = time.monotonic()
  results = _wait(_two(tmp_path / "two", folder, recipe, 4))
  wall = time.monotonic() - t0
  for code, _, err in results:
    assert code == 0, err[-3000:]
  _one(tmp_path / "one", folder, recipe, 4)
  two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
  assert [l["step"] for l in two] == [2, 4]  # Each line once.
  for a, b in zip(one, two):
    for key in ("train_loss", "test_loss", "model_cp"):
      assert b[key] == pytest.approx(a[key], rel=rtol), (key, a[key], b[key])
  # Process 0 alone wrote the record and printed the progress and the result.
  (code0, out0, err0), (code1, out1, err1) = results
  assert "Done: final test" in err0 and "Done: final test" not in err1
  assert "'final_test_acc'" in out0 and "'final_test_acc'" not in out1
  log = (tmp_path / "two" / run_files.LOG).read_text()
  assert log.count("step 2/4 | train loss") == 1
  assert len(list((tmp_path / "two" / run_files.TENSORBOARD).iterdir())) == 1
  summary = json.loads((tmp_path / "two" / run_files.SUMMARY).read_text())
  assert summary["iters"] == 4
  print(f"two processes ({recipe}): {wall:.1f} s")


def test_two_processes_each_decode_their_rows_of_the_imagenet_stream(tmp_path):
  # Each process decodes half of every train and test batch; the global arrays,
  # hence the run, are the one-process run's.
  extra = ("--config.data.dataset=imagenet2012", "--config.data.image_size=32")
  results = _wait(_two(tmp_path / "two", None, "fp32", 2, *extra, mock=True))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  _one(tmp_path / "one", None, "fp32", 2, *extra, mock=True)
  (two,), (one,) = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
  assert json.loads((tmp_path / "two" / run_files.SUMMARY).read_text())["dataset"] == "imagenet2012"
  for key in ("train_loss", "test_loss", "test_acc"):
    assert two[key] == pytest.approx(one[key], rel=1e-5), (key, one[key], two[key])


def test_a_process_whose_peers_never_come_says_so_and_gives_up(tmp_path, folder):
  port = _free_port()
  address = f"localhost:{port}"
  cmd = _cmd(tmp_path / "run", folder, "sbm", 4, f"--coordinator_address={address}",
             "--num_processes=2", "--process_id=0", "--distributed_timeout=6")
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    waiting = proc.stderr.readline()  # Within seconds: what it waits for.
    said = time.monotonic() - t0
    (code, _, err), = _wait([proc], timeout=60)
  finally:
    proc.kill()
  assert (f"Waiting for all 2 processes at the coordinator {address} (this is process 0); "
          "giving up after 6 s") in waiting, waiting
  assert said < 30 and time.monotonic() - t0 < 40
  assert code == 2
  assert err.strip().splitlines() == [
      f"error: gave up waiting for all 2 processes at the coordinator {address} (this is "
      "process 0) after 6 s (--distributed_timeout); start each with the same "
      "--coordinator_address and --num_processes and its own --process_id"]


def test_a_signal_to_one_process_stops_both_and_the_run_resumes_across_topologies(tmp_path, folder):
  run_dir = tmp_path / "run"
  procs = _two(run_dir, folder, "sbm", 100000, "--config.train.log_every=2")
  try:
    for line in procs[0].stderr:  # Process 0 prints; wait until it trains.
      if "step 4/100000 | train loss" in line:
        break
    procs[1].send_signal(signal.SIGINT)  # Ctrl-C to the process that prints nothing.
    results = _wait(procs, timeout=120)
  finally:
    for p in procs:
      p.kill()
  for code, out, err in results:
    assert code == 128 + signal.SIGINT, err[-3000:]
  # Process 0 says which process received which signal.
  assert "with a checkpoint (SIGINT (signal 2) received by process 1)" in results[0][2]
  steps = sorted(int(p.name) for p in (run_dir / run_files.CHECKPOINTS).iterdir()
                 if p.name.isdigit())
  saved = steps[-1]
  # One process of four devices resumes the two-process checkpoint and goes on;
  # two processes resume that one-process checkpoint in turn.
  done = _one(run_dir, folder, "sbm", saved + 2)
  assert f"Resuming static resnet8 in {run_dir} from step {saved}" in done.stderr
  results = _wait(_two(run_dir, folder, "sbm", saved + 4))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  assert f"from step {saved + 2}" in results[0][2]
  lines = read_metrics(run_dir)
  assert [l["step"] for l in lines] == sorted({l["step"] for l in lines})
  assert lines[-1]["step"] == saved + 4
