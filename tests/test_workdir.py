"""The workdir as the run's record: after any crash, refusal or failure its files agree.

After every case: ``metrics.jsonl`` parses as strict JSON (no NaN or Infinity
tokens), its steps strictly increase, and its last line is the newest
checkpoint's evaluation; the exit code and the one-line message are checked
where the entry point matters (subprocesses of main.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fractrain_jax import errors
from fractrain_jax.run import checkpoints, workdir
from fractrain_jax.run import files as run_files
from test_train import _image_folder, run_mock, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reject_constant(name):
  raise ValueError(f"non-strict JSON token {name}")


def strict_lines(run_dir) -> list[dict]:
  """metrics.jsonl as strict JSON: NaN / Infinity tokens raise."""
  path = pathlib.Path(run_dir) / run_files.METRICS
  if not path.exists():
    return []
  return [json.loads(l, parse_constant=_reject_constant) for l in path.read_text().splitlines()]


def assert_consistent(run_dir, *, last_step: int | None = None):
  """One line per evaluated step, strictly increasing, ending at the newest checkpoint's
  evaluation (or at ``last_step``)."""
  lines = strict_lines(run_dir)
  steps = [l["step"] for l in lines]
  assert steps == sorted(set(steps)), steps
  ckpt_dir = pathlib.Path(run_dir) / run_files.CHECKPOINTS
  committed = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) \
      if ckpt_dir.is_dir() else []
  if committed:
    record = checkpoints.Checkpoints(pathlib.Path(run_dir), 3).read_meta(committed[-1]).record
    want = None if record is None else record["step"]
    assert (steps[-1] if steps else None) == want, (steps, committed)
  if last_step is not None:
    assert steps[-1] == last_step, steps
  assert not list(pathlib.Path(run_dir).glob(f"{run_files.CHECKPOINTS}/*orbax-checkpoint-tmp*"))
  return lines


def without_wall(lines):
  return [{k: v for k, v in l.items() if k != "wall_s"} for l in lines]


# ---------------------------------------------------------------- metrics follow checkpoints


def test_lines_written_after_the_restored_checkpoint_are_dropped(tmp_path):
  config = tiny_config("pfq", **{"train.iters": 8})
  run_mock(config, tmp_path / "whole")
  assert run_mock(config, tmp_path / "split", stop_at=5) == {"stopped_at": 5}
  # What a crash after step 6 (its checkpoint never committed) and an older version's NaN
  # token left behind: both go when the run starts again.
  metrics = tmp_path / "split" / run_files.METRICS
  lines = metrics.read_text().splitlines()
  stray = json.loads(lines[-1])
  extra = [json.dumps(stray | {"step": 6}), json.dumps(stray | {"step": 7, "lr": math.nan})]
  assert "NaN" in extra[1]
  metrics.write_text("\n".join(lines + extra) + "\n")
  run_mock(config, tmp_path / "split")
  assert without_wall(assert_consistent(tmp_path / "split", last_step=8)) == without_wall(
      strict_lines(tmp_path / "whole"))


def test_a_crash_between_checkpoint_and_line_loses_nothing(tmp_path, monkeypatch):
  config = tiny_config("frac", **{"train.iters": 6})
  run_mock(config, tmp_path / "whole")
  real = workdir.MetricsFile.append

  def crash_at_4(self, record):
    if record["step"] == 4:
      raise KeyboardInterrupt("killed between the checkpoint of step 4 and its line")
    real(self, record)

  monkeypatch.setattr(workdir.MetricsFile, "append", crash_at_4)
  with pytest.raises(KeyboardInterrupt):
    run_mock(config, tmp_path / "split")
  assert [l["step"] for l in strict_lines(tmp_path / "split")] == [2]
  monkeypatch.setattr(workdir.MetricsFile, "append", real)
  run_mock(config, tmp_path / "split")  # Step 4's line comes back from its checkpoint.
  assert without_wall(assert_consistent(tmp_path / "split", last_step=6)) == without_wall(
      strict_lines(tmp_path / "whole"))


def test_tensorboard_history_follows_the_restored_checkpoint(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # pylint: disable=import-outside-toplevel

  config = tiny_config("static", **{"train.iters": 6})
  run_mock(config, tmp_path, stop_at=4)
  shutil.rmtree(tmp_path / run_files.CHECKPOINTS / "4")  # Back to step 2.
  run_mock(config, tmp_path)
  (events,) = (tmp_path / run_files.TENSORBOARD).glob("events.out.tfevents.*")
  acc = EventAccumulator(str(events))
  acc.Reload()
  assert [e.step for e in acc.Scalars("test_acc")] == [2, 4, 6]


# ---------------------------------------------------------------- refusals that keep the record


def test_nothing_restorable_is_refused_and_the_record_kept(tmp_path):
  config = tiny_config("static", **{"train.iters": 4})
  run_mock(config, tmp_path)
  before = {f: (tmp_path / f).read_text() for f in (run_files.METRICS, run_files.SUMMARY)}
  for step_dir in (tmp_path / run_files.CHECKPOINTS).iterdir():
    if step_dir.name.isdigit():
      (step_dir / "meta" / "metadata").unlink()
  config.train.iters = 8
  kept = sorted(p.name for p in (tmp_path / run_files.CHECKPOINTS).iterdir())
  with pytest.raises(errors.ResumeError, match=r"no checkpoint in .* restores \(step 4: .*\); "
                                                "nothing was moved"):
    run_mock(config, tmp_path)
  assert {f: (tmp_path / f).read_text() for f in before} == before
  # A failure of every checkpoint is not the files' fault (another library, say): none moves.
  assert sorted(p.name for p in (tmp_path / run_files.CHECKPOINTS).iterdir()) == kept
  assert not (tmp_path / "checkpoints_bad").exists()


@pytest.mark.parametrize("iters", [4, 3])
def test_a_resume_that_cannot_continue_leaves_the_summary(tmp_path, iters):
  config = tiny_config("static", **{"train.iters": 4})
  summary = run_mock(config, tmp_path)
  text = (tmp_path / run_files.SUMMARY).read_text()
  # The JSON files follow the umask, as metrics.jsonl and log.txt do (not mkstemp's 0600).
  modes = {f: (tmp_path / f).stat().st_mode & 0o777 for f in
           (run_files.CONFIG, run_files.SUMMARY, run_files.METRICS, run_files.LOG)}
  assert len(set(modes.values())) == 1, modes
  config.train.iters = iters
  if iters == 4:  # Finished: the same summary, nothing trained.
    assert run_mock(config, tmp_path) == summary
  else:
    with pytest.raises(errors.ResumeError, match="at step 4, past train.iters .* = 3: nothing "
                                                  "to train"):
      run_mock(config, tmp_path)
  assert (tmp_path / run_files.SUMMARY).read_text() == text
  assert_consistent(tmp_path, last_step=4)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_json_files_follow_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    workdir.write_json(tmp_path / run_files.CONFIG, {"a": 1})
  finally:
    os.umask(old)
  assert (tmp_path / run_files.CONFIG).stat().st_mode & 0o777 == 0o666 & ~umask
  assert [p.name for p in tmp_path.iterdir()] == [run_files.CONFIG]  # No temporary file left.


# ---------------------------------------------------------------- divergence


def test_fractrain_divergence_stops_at_once_and_a_sane_resume_trains_on(tmp_path):
  config = tiny_config("frac", **{"train.iters": 12, "train.eval_every": 4})
  assert run_mock(config, tmp_path, stop_at=4) == {"stopped_at": 4}
  config.optim.lr = 1e4
  with pytest.raises(errors.NonFiniteError) as info:
    run_mock(config, tmp_path)
  message = str(info.value)
  assert "\n" not in message and "kept the checkpoint of step 4" in message
  # Stopped at the first bad step, before its interval's end at 8 was checkpointed.
  assert 4 < int(re.search(r"at step (\d+)", message).group(1)) <= 8, message
  lines = assert_consistent(tmp_path, last_step=4)
  assert all(math.isfinite(l["train_loss"]) and l["train_loss"] < 100 for l in lines)
  config.optim.lr = 0.01
  summary = run_mock(config, tmp_path)
  assert summary["iters"] == 12 and math.isfinite(summary["final_test_acc"])
  assert_consistent(tmp_path, last_step=12)


# ---------------------------------------------------------------- main.py in a subprocess


def _main(run_dir, folder, *extra, iters=6, preexec=None, env_extra=None, cache=True):
  """main.py on ``folder``; ``cache``: the test session's compilation cache (shared by the
  tests, so off for a process killed mid-run or denied its writes)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
  cmd = [sys.executable, "main.py", "--config", "configs/sbm_cifar10.py",
         f"--config.data.dataset=folder:{folder}", "--config.model.name=resnet8",
         f"--config.train.iters={iters}", "--config.train.batch_size=4",
         "--config.train.eval_every=2", "--config.train.eval_batch_size=4",
         "--config.train.log_every=1", f"--workdir={run_dir}",
         *([] if cache else ["--nocompilation_cache"]), *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def _finish(proc, timeout=300):
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    proc.kill()
  return proc.returncode, out, err


def _error_line(err: str) -> str:
  (line,) = [l for l in err.splitlines() if l.startswith("error:")]
  assert "Traceback" not in err, err[-3000:]
  return line


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _image_folder(tmp_path_factory.mktemp("images") / "f", per_class=4)


def test_one_run_per_workdir_and_a_dead_runs_lock_is_taken_over(tmp_path, folder):
  first = _main(tmp_path / "run", folder, iters=100000, cache=False)
  try:
    for line in first.stderr:
      if "Starting" in line:
        break
    code, _, err = _finish(_main(tmp_path / "run", folder), timeout=120)
    assert code == 2
    line = _error_line(err)
    assert "is in use by another run (pid" in line and str(first.pid) in line
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  finally:
    first.kill()
  code, _, err = _finish(_main(tmp_path / "run", folder, iters=4))
  assert code == 0, err[-3000:]
  assert f"Took over the lock of {tmp_path / 'run'} left by pid {first.pid}" in err
  assert_consistent(tmp_path / "run", last_step=4)


@contextlib.contextmanager
def _small_disk(path: pathlib.Path, size: str = "1500k"):
  """A tmpfs of ``size`` at ``path`` (root only); None where mounting is not allowed."""
  path.mkdir(parents=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, check=False)
  try:
    yield done.returncode == 0
  finally:
    if done.returncode == 0:
      subprocess.run(["umount", "-l", str(path)], check=False)


def _file_size_limit(limit: int):
  """For preexec_fn: writes past ``limit`` bytes fail with EFBIG (a quota, per file)."""

  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  return apply


def test_a_full_disk_stops_in_one_line_and_leaves_no_partial_checkpoint(tmp_path, folder):
  with _small_disk(tmp_path / "disk") as mounted:
    run_dir = tmp_path / "disk" / "run"
    # Without a mount: a per-file size limit that the checkpoints' arrays pass first.
    preexec = None if mounted else _file_size_limit(64 * 1024)
    t0 = time.monotonic()
    code, _, err = _finish(_main(run_dir, folder, iters=100000, preexec=preexec, cache=False),
                           timeout=120)
    assert time.monotonic() - t0 < 120
    assert code == 2, err[-3000:]
    line = _error_line(err)
    assert "cannot write" in line and str(run_dir) in line
    assert ("No space left on device" in line or "File too large" in line), line
    # How much room the run needs, so the user knows what to free.
    assert re.search(r"a checkpoint takes about \d+\.\d MB and checkpoint.keep=3 are kept, "
                     r"\d+\.\d [MG]B free there\)", line), line
    assert not list(run_dir.glob(f"{run_files.CHECKPOINTS}/*orbax-checkpoint-tmp*"))
    found = re.search(r"the newest checkpoint kept is step (\d+)", line)
    assert found or "no checkpoint is kept" in line, line
    kept = int(found.group(1)) if found else 0
    # With room again, the same command resumes from the kept checkpoint.
    if mounted:
      subprocess.run(["mount", "-o", "remount,size=8m", str(tmp_path / "disk")], check=True)
    code, _, err = _finish(_main(run_dir, folder, iters=kept + 2))
    assert code == 0, err[-3000:]
    assert (f"from step {kept}" if kept else "Starting") in err
    assert_consistent(run_dir, last_step=kept + 2)


@pytest.mark.parametrize("where", [run_files.CHECKPOINTS, run_files.TENSORBOARD, "."])
def test_an_unwritable_folder_is_named_at_once(tmp_path, folder, where):
  run_dir = tmp_path / "run"
  target = run_dir / where
  target.mkdir(parents=True, exist_ok=True)
  if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode:
    pytest.skip("chattr +i is not available to make a folder unwritable")
  try:
    t0 = time.monotonic()
    code, _, err = _finish(_main(run_dir, folder), timeout=60)
    assert time.monotonic() - t0 < 60
  finally:
    subprocess.run(["chattr", "-i", str(target)], check=False)
  assert code == 2, err[-3000:]
  line = _error_line(err)
  assert "cannot write" in line and str(target.resolve()) in line, line


def test_a_corrupt_newest_checkpoint_is_one_line_every_time(tmp_path, folder):
  run_dir = tmp_path / "run"
  code, _, err = _finish(_main(run_dir, folder, iters=4))
  assert code == 0, err[-3000:]
  # The main.py path of both kinds of damage; test_run_safety repeats a restore in-process.
  for attempt in range(2):
    newest = max(int(p.name) for p in (run_dir / run_files.CHECKPOINTS).iterdir()
                 if p.name.isdigit())
    files = [f for f in (run_dir / run_files.CHECKPOINTS / str(newest) / "state").rglob("*")
             if f.is_file() and f.stat().st_size > 100]
    # Every file cut short, or (what left Orbax's reads pending) only the largest array file.
    for f in files if attempt % 2 else [max(files, key=lambda f: f.stat().st_size)]:
      f.write_bytes(f.read_bytes()[:100])
    code, _, err = _finish(_main(run_dir, folder, iters=4 + 2 * (attempt + 1)))
    assert code == 0, err[-3000:]
    warnings = [l for l in err.splitlines() if "could not be restored" in l]
    assert len(warnings) == 1 and f"step {newest}" in warnings[0], err[-3000:]
    assert "TensorStore(" not in warnings[0], warnings[0]
    if attempt == 0:  # TensorStore's own reason for the array file, not Orbax's wrapper.
      assert "is not valid for value of size 100)" in warnings[0], warnings[0]
    # Every stderr line is one of this package's (they start with the time).
    noise = [l for l in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d ", l)]
    assert not noise, noise[:20]
    assert_consistent(run_dir)


@pytest.mark.parametrize("argv,needle", [
    (["--config.train.num_iters=5"],
     "unknown config key config.train.num_iters (in --config.train.num_iters=...); did you "
     "mean config.train.iters?"),
    (["--config.dfq.targt_cp=2"], "did you mean config.dfq.target_cp?"),
])
def test_config_mistakes_are_one_line(argv, needle):
  done = subprocess.run([sys.executable, "main.py", "--config", "configs/frac_cifar10.py", *argv],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("error: unknown config key") and line.endswith(needle), line


def test_a_misspelt_key_in_a_config_file_is_refused_like_on_the_command_line(tmp_path):
  recipe = tmp_path / "my_recipe.py"
  recipe.write_text("from configs import sbm_cifar10\n\n\ndef get_config():\n"
                    "  c = sbm_cifar10.get_config()\n  c.optim.learning_rate = 0.01\n  return c\n")
  done = subprocess.run([sys.executable, "main.py", "--config", str(recipe)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      f"error: unknown config key config.optim.learning_rate (set in config file "
      f"{str(recipe)!r}); did you mean config.optim.lr?"]


@pytest.mark.parametrize("argv,needle", [
    (["--config", "configs/sbm_cifar10.py", "--config.train.iters=abc"],
     "error: flag --config.train.iters=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config", "configs/sbm_cifar10.py", "--workdr=/tmp/x"],
     "error: Unknown command line flag 'workdr'. Did you mean: workdir ?"),
    ([], "error: --config is required"),
])
def test_flag_mistakes_exit_2_with_one_error_line(argv, needle):
  done = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 2
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith(needle), line


def test_help_names_every_model():
  from fractrain_jax import models  # pylint: disable=import-outside-toplevel

  done = subprocess.run([sys.executable, "main.py", "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0
  text = done.stdout.split("--config.model.name=")[1].split("--config.data")[0]
  spelt = set()
  for token in re.findall(r"[a-z_]+[\d/]*\d|[a-z_]+", text):  # resnet20/38 is two names.
    prefix = re.match(r"[a-z_]+", token).group()
    spelt |= {prefix + n for n in token[len(prefix):].split("/")}
  missing = (set(models.available()) | {models.LM}) - spelt
  assert not missing, (missing, text)


def test_a_config_file_syntax_error_names_its_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n\n\ndef get_config(:\n  return None\n")
  done = subprocess.run([sys.executable, "main.py", "--config", str(bad)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith(f"error: {bad}:4: ") and line.endswith(f"(config file {str(bad)!r})")


def test_helpfull_lists_every_flag_and_exits_0():
  done = subprocess.run([sys.executable, "main.py", "--helpfull"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0
  assert "--workdir" in done.stdout and "--[no]compilation_cache" in done.stdout


def test_a_failed_start_writes_its_error_to_log_and_leaves_no_empty_folder(tmp_path, folder):
  run_dir = tmp_path / "run"
  code, _, err = _finish(_main(run_dir, tmp_path / "nowhere"))
  assert code == 2
  line = _error_line(err)
  assert str(tmp_path / "nowhere") in line
  assert line in (run_dir / run_files.LOG).read_text()
  assert sorted(p.name for p in run_dir.iterdir()) == [run_files.LOG]


def test_a_record_without_checkpoints_is_refused_not_replaced(tmp_path, folder):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  record = {run_files.METRICS: '{"step": 2, "test_acc": 50.0}\n{"step": 4, "test_acc": 75.0}\n',
            run_files.SUMMARY: '{"final_test_acc": 75.0}\n'}
  for name, text in record.items():  # checkpoints/ deleted, the record kept.
    (run_dir / name).write_text(text)
  code, _, err = _finish(_main(run_dir, folder), timeout=120)
  assert code == 2, err[-3000:]
  line = _error_line(err)
  assert (f"{run_dir} holds the record of an earlier run (2 lines in metrics.jsonl, up to step "
          "4, summary.json) but no checkpoint to resume from") in line, line
  assert "to start over, move metrics.jsonl and summary.json aside" in line, line
  assert {n: (run_dir / n).read_text() for n in record} == record
  assert not (run_dir / run_files.CHECKPOINTS).exists()


def test_a_one_class_folder_is_refused(tmp_path):
  one = _image_folder(tmp_path / "one", per_class=2)
  for split in ("train", "test"):
    shutil.rmtree(one / split / "dog")
  code, _, err = _finish(_main(tmp_path / "run", one), timeout=120)
  assert code == 2, err[-3000:]
  assert (f"{one / 'train'} has one class subfolder (cat); a classification dataset needs at "
          "least 2") in _error_line(err)


def test_the_same_folder_spelt_differently_is_the_same_run(tmp_path, folder):
  run_dir = tmp_path / "run"
  code, _, err = _finish(_main(run_dir, folder, iters=2))
  assert code == 0, err[-3000:]
  relative = os.path.relpath(folder, REPO) + "/./"
  code, _, err = _finish(_main(run_dir, relative, iters=4))
  assert code == 0, err[-3000:]
  assert "Resuming" in err
  assert_consistent(run_dir, last_step=4)


def test_without_a_terminal_a_line_every_log_every_steps(tmp_path, folder):
  # JAX_PLATFORMS unset, as a user has it: JAX looks for every backend it knows.
  code, _, err = _finish(_main(tmp_path / "run", folder, "--config.train.eval_every=4",
                               iters=4, env_extra={"JAX_PLATFORMS": ""}))
  assert code == 0, err[-3000:]
  for needle in ("step 1/4 | loss", "step 2/4 | loss", "step 3/4 | loss", "img/s",
                 "step 4/4 | train loss"):
    assert needle in err, (needle, err[-2000:])
  for noise in ("Unable to initialize backend", "W0000", "E0000"):
    assert noise not in err
