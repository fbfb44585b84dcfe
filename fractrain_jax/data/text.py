"""A word-level text corpus (``text:PATH``) as token windows held in memory.

PATH is a folder in the WikiText layout: ``wiki.{train,valid,test}.tokens``
(WikiText-103 and -2 as released) or ``{train,valid,test}.txt``. Which split
trains and which evaluates is the config's choice (``data.text_train``,
``data.text_test``), so the shipped WikiText-2 validation text can train a
CPU-scale model that is tested on its test text.

As in the usual word-level LM setup (PyTorch's word_language_model): words
are split on whitespace, every line ends with ``<eos>`` (blank lines too),
the vocabulary is the training split's words in order of first appearance,
and a word the training split never saw reads as ``<unk>`` (WikiText already
writes rare words so).

Training: the stream is cut into consecutive non-overlapping windows of
``context`` inputs, each with the next ``context`` tokens as targets. The
train step picks whole windows in a seeded order that is a pure function of
``(seed, step)`` (``data.batch_indices``, the same as for images), so a
resumed run reads the same batches. Evaluation covers every next-token
prediction of the test stream once, in windows of ``context`` (each window
starts without the previous one's context); the last window is padded and
its padding masked out.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import numpy as np

from fractrain_jax.data.common import TEXT_PREFIX
from fractrain_jax.errors import ConfigError, DataError, DataFormatError

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"


@dataclasses.dataclass(frozen=True)
class TextData:
  """Token streams of a training and a test split, and the training split's vocabulary."""

  train_tokens: np.ndarray  # int32 (N,)
  test_tokens: np.ndarray  # int32 (M,)
  vocab: tuple[str, ...]
  context: int
  # Images are normalized with these; token ids are not.
  mean = None
  std = None

  @property
  def num_classes(self) -> int:
    """The output layer's width: the vocabulary size."""
    return len(self.vocab)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape: a window of ``context`` token ids."""
    return (self.context,)

  @property
  def num_train(self) -> int:
    """Training windows of ``context`` tokens."""
    return (len(self.train_tokens) - 1) // self.context

  @property
  def num_test(self) -> int:
    """Test predictions (every token but the first has one)."""
    return len(self.test_tokens) - 1

  def describe(self) -> str:
    """One line for the run's log."""
    return (f"{len(self.train_tokens)} training tokens ({self.num_train} windows of "
            f"{self.context}), {len(self.test_tokens)} test tokens, vocabulary "
            f"{self.num_classes}")

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets of every training window, int32 ``(num_train, context)``."""
    n, t = self.num_train, self.context
    stream = self.train_tokens
    return stream[:n * t].reshape(n, t), stream[1:n * t + 1].reshape(n, t)

  def test_batches(self, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The test stream as ``(inputs, targets, valid)`` batches of ``(batch_size, context)``.

    ``valid`` marks real predictions; the last window's tail and the last
    batch's missing windows are padding (token 0), so every batch has one shape.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    t, n = self.context, self.num_test
    windows = -(-n // t)
    total = -(-windows // batch_size) * batch_size * t
    inputs, targets, valid = (np.zeros(total, np.int32) for _ in range(3))
    inputs[:n], targets[:n], valid[:n] = self.test_tokens[:-1], self.test_tokens[1:], 1
    shape = (-1, batch_size, t)
    for x, y, v in zip(inputs.reshape(shape), targets.reshape(shape), valid.reshape(shape)):
      yield x, y, v.astype(bool)


def split_file(root: pathlib.Path, split: str) -> pathlib.Path:
  """The file of ``split`` in ``root``: ``wiki.<split>.tokens`` or ``<split>.txt``."""
  names = (f"wiki.{split}.tokens", f"{split}.txt")
  for name in names:
    if (root / name).is_file():
      return root / name
  present = sorted(p.name for p in root.iterdir())[:10]
  raise DataError(f"text folder {root} has no {split!r} split: looked for {' or '.join(names)}; "
                  f"it holds {present or 'nothing'}")


def read_words(path: pathlib.Path) -> list[str]:
  """The file's words, ``<eos>`` at the end of every line; refuses a file with no words."""
  words = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      words.extend(line.split())
      words.append(EOS)
  if len(words) == words.count(EOS):
    raise DataFormatError(f"{path} holds no words (it is empty or blank)")
  return words


def build_vocab(words: list[str]) -> tuple[str, ...]:
  """Each distinct word once, in order of first appearance; ``<unk>`` appended if absent."""
  vocab = tuple(dict.fromkeys(words))
  return vocab if UNK in vocab else vocab + (UNK,)


def encode(words: list[str], vocab: tuple[str, ...]) -> np.ndarray:
  """Token ids of ``words``; a word outside ``vocab`` is ``<unk>``."""
  index = {w: i for i, w in enumerate(vocab)}
  unk = index[UNK]
  return np.fromiter((index.get(w, unk) for w in words), np.int32, len(words))


def load_text(dataset: str, *, context: int, train_split: str = "train",
              test_split: str = "test", train_subset: int = 0, test_subset: int = 0
              ) -> TextData:
  """Reads ``text:PATH``: the vocabulary from ``train_split``, both splits as token streams.

  train_subset, test_subset: keep only the first this many tokens of the
    split (0 = all); the vocabulary still comes from the whole training split.
    A short test prefix makes frequent evaluations cheap.
  """
  root = pathlib.Path(dataset[len(TEXT_PREFIX):]).expanduser()
  if not root.is_dir():
    raise DataError(f"text folder {root} does not exist; expected a folder with "
                    "wiki.{train,valid,test}.tokens or {train,valid,test}.txt")
  for split in (train_split, test_split):
    if split not in SPLITS:
      raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  train_words = read_words(split_file(root, train_split))
  vocab = build_vocab(train_words)
  train = encode(train_words, vocab)
  test = encode(read_words(split_file(root, test_split)), vocab)
  for what, size, stream in (("train_subset", train_subset, train),
                             ("test_subset", test_subset, test)):
    if size > len(stream) or size == 1:
      raise ConfigError(f"{what}={size} tokens; expected 0 (all) or 2..{len(stream)}, the "
                        "split's length")
  data = TextData(train[:train_subset or None], test[:test_subset or None], vocab, context)
  if data.num_train < 1:
    raise DataFormatError(f"the {train_split!r} split of {root} has {len(data.train_tokens)} tokens; "
                          f"one training window needs context + 1 = {context + 1}")
  return data
