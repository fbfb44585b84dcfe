"""The word-level text loader (``text:PATH``): vocabulary, ``<eos>``, windows, order, errors."""

import chex
import jax
import numpy as np
import pytest

from fractrain_jax import data
from fractrain_jax.errors import ConfigError, DataError, DataFormatError

TRAIN = "the cat sat\n\nthe dog ran far\n"
TEST = "the cat flew\na dog\n"


def write(folder, files):
  folder.mkdir(parents=True, exist_ok=True)
  for name, body in files.items():
    (folder / name).write_text(body)
  return f"text:{folder}"


def test_vocabulary_eos_and_unknown_words(tmp_path):
  ds = write(tmp_path, {"train.txt": TRAIN, "test.txt": TEST})
  d = data.load_text(ds, context=2)
  # Order of first appearance, <eos> after every line (the blank one too), <unk> appended.
  assert d.vocab == ("the", "cat", "sat", "<eos>", "dog", "ran", "far", "<unk>")
  words = "the cat sat <eos> <eos> the dog ran far <eos>".split()
  np.testing.assert_array_equal(d.train_tokens, [d.vocab.index(w) for w in words])
  # Words the training split never saw read as <unk>.
  test_words = "the cat <unk> <eos> <unk> dog <eos>".split()
  np.testing.assert_array_equal(d.test_tokens, [d.vocab.index(w) for w in test_words])
  assert d.num_classes == 8


def test_wikitext_file_names_and_split_choice(tmp_path):
  ds = write(tmp_path, {"wiki.valid.tokens": TRAIN, "wiki.test.tokens": TEST})
  d = data.load_text(ds, context=2, train_split="valid", test_split="test")
  assert d.vocab[:3] == ("the", "cat", "sat")


def test_train_windows_are_consecutive_with_next_token_targets(tmp_path):
  ds = write(tmp_path, {"train.txt": " ".join(f"w{i}" for i in range(10)) + "\n",
                        "test.txt": TEST})
  d = data.load_text(ds, context=3)
  x, y = d.train_arrays()
  # 11 tokens (10 words, <eos>) give 10 predictions: 3 whole windows of 3.
  chex.assert_shape((x, y), (3, 3))
  np.testing.assert_array_equal(x, np.arange(9).reshape(3, 3))
  np.testing.assert_array_equal(y, np.arange(1, 10).reshape(3, 3))


def test_test_batches_cover_every_prediction_once(tmp_path):
  ds = write(tmp_path, {"train.txt": TRAIN, "test.txt": TEST * 3})
  d = data.load_text(ds, context=4)
  batches = list(d.test_batches(2))
  chex.assert_shape([b[0] for b in batches], (2, 4))
  valid = np.concatenate([v.ravel() for _, _, v in batches])
  x = np.concatenate([b[0].ravel() for b in batches])[valid]
  y = np.concatenate([b[1].ravel() for b in batches])[valid]
  np.testing.assert_array_equal(x, d.test_tokens[:-1])
  np.testing.assert_array_equal(y, d.test_tokens[1:])
  assert valid.sum() == d.num_test == len(d.test_tokens) - 1


def test_window_order_is_a_seeded_function_of_the_step(tmp_path):
  """The train step's order: every window once per epoch, the same for the same (seed, step)."""
  words = " ".join(f"w{i}" for i in range(40)) + "\n"
  d = data.load_text(write(tmp_path, {"train.txt": words, "test.txt": TEST}), context=4)
  key = jax.random.key(0)
  per_epoch = d.num_train // 2
  order = [np.asarray(data.batch_indices(key, s, d.num_train, 2)) for s in range(2 * per_epoch)]
  first = np.sort(np.concatenate(order[:per_epoch]))
  np.testing.assert_array_equal(first, np.arange(2 * per_epoch))
  # Resuming at step s asks for step s again: the same windows.
  again = [np.asarray(data.batch_indices(key, s, d.num_train, 2)) for s in range(3, 2 * per_epoch)]
  np.testing.assert_array_equal(np.stack(again), np.stack(order[3:]))
  assert not np.array_equal(np.concatenate(order[:per_epoch]),
                            np.concatenate(order[per_epoch:]))


def test_subsets_are_token_prefixes(tmp_path):
  d = data.load_text(write(tmp_path, {"train.txt": TRAIN, "test.txt": TEST * 4}), context=2,
                     train_subset=6, test_subset=5)
  full = data.load_text(f"text:{tmp_path}", context=2)
  np.testing.assert_array_equal(d.train_tokens, full.train_tokens[:6])
  np.testing.assert_array_equal(d.test_tokens, full.test_tokens[:5])
  assert d.vocab == full.vocab
  with pytest.raises(ConfigError, match="test_subset=999"):
    data.load_text(f"text:{tmp_path}", context=2, test_subset=999)


def test_missing_folder_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    data.load_text(f"text:{tmp_path / 'nowhere'}", context=4)


def test_missing_split_names_the_files_looked_for(tmp_path):
  ds = write(tmp_path, {"train.txt": TRAIN})
  with pytest.raises(DataError, match=r"no 'test' split: looked for wiki.test.tokens or test.txt"):
    data.load_text(ds, context=4)


@pytest.mark.parametrize("body", ["", "\n  \n\n"])
def test_empty_file_is_refused(tmp_path, body):
  ds = write(tmp_path, {"train.txt": TRAIN, "test.txt": body})
  with pytest.raises(DataFormatError, match="test.txt holds no words"):
    data.load_text(ds, context=4)


def test_a_split_shorter_than_one_window_is_refused(tmp_path):
  ds = write(tmp_path, {"train.txt": "a b\n", "test.txt": TEST})
  with pytest.raises(DataFormatError, match="one training window needs context"):
    data.load_text(ds, context=8)


def test_dataset_name_needs_a_path():
  with pytest.raises(ValueError, match="names no folder"):
    data.is_text("text:")
  assert data.is_text("text:/x") and not data.is_streamed("text:/x")
