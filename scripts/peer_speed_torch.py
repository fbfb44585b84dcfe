"""Times one PyTorch training step of the peers that `scripts/peer_speed.sh` compares with.

Run by that script inside a throwaway venv that holds PyTorch (never a project
dependency); it prints one JSON object per line: system, method, step_ms
(median) and min_step_ms.

  plain:   a CIFAR ResNet-(6n+2) written here with torch.nn (the architecture of
           fractrain_jax/models/resnet_cifar.py), FP32, in NCHW or channels-last.
  authors: the authors' FracTrain code (GATECH-EIC/FracTrain, fractrain_cifar/),
           imported from --authors-dir: FP32 (num_bits 0), static 8/8, PFQ at its
           first stage (3/6, train_pfq.py's README schedule; static and PFQ with
           train_pfq.py's default --weight_bits 0, which leaves the weights in
           full precision) and DFQ (cifar10_rnn_gate_*, train_dfq.py's
           candidates, 4-bit weights and computation loss).
           Their code calls .cuda() everywhere; here .cuda() returns the tensor
           itself so that it runs on the CPU, nothing else of it is changed.

A step: forward, cross-entropy (plus DFQ's computation loss), backward and an
SGD step with momentum 0.9 and weight decay 5e-4 on random CIFAR-shaped data,
timed after warm-up, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

# train_dfq.py's candidates (lines 181-182): forward and backward bits.
AUTHORS_DFQ_BITS = [3, 4, 4, 6, 6]
AUTHORS_DFQ_GRAD_BITS = [6, 6, 8, 8, 12]
AUTHORS_DFQ_WEIGHT_BITS = 4
# method -> (num_bits, num_grad_bits) of the authors' ResNet forward.
AUTHORS_STATIC = {"fp32": (0, 0), "static": (8, 8), "pfq": (3, 6)}


class BasicBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):

  def __init__(self, depth: int, num_classes: int):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                              nn.ReLU())
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
        cin = width
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def plain_step(args):
  model = CifarResNet(args.depth, args.num_classes)
  x = torch.randn(args.batch_size, 3, 32, 32)
  if args.layout == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, args.num_classes, (args.batch_size,))
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()

  return step


def authors_step(args, method: str):
  # Their modules call .cuda() on new tensors; on the CPU that is the tensor itself.
  torch.Tensor.cuda = lambda self, *a, **k: self
  nn.Module.cuda = lambda self, *a, **k: self
  sys.path.insert(0, os.path.join(args.authors_dir, "fractrain_cifar"))
  import models  # pylint: disable=import-outside-toplevel  # The authors' models.py.

  x = torch.randn(args.batch_size, 3, 32, 32)
  y = torch.randint(0, args.num_classes, (args.batch_size,))
  if method == "dfq":
    models.WEIGHT_BITS = AUTHORS_DFQ_WEIGHT_BITS
    model = getattr(models, f"cifar10_rnn_gate_{args.depth}")(proj_dim=len(AUTHORS_DFQ_BITS))
    n_cand = len(AUTHORS_DFQ_BITS)
    cost = torch.tensor([AUTHORS_DFQ_WEIGHT_BITS * b / 32 / 32 + AUTHORS_DFQ_WEIGHT_BITS * g / 32 / 32
                         + b * g / 32 / 32 for b, g in zip(AUTHORS_DFQ_BITS, AUTHORS_DFQ_GRAD_BITS)])

    def loss_fn():
      out, masks = model(x, AUTHORS_DFQ_BITS, AUTHORS_DFQ_GRAD_BITS)
      # train_dfq.py's computation loss, every block weighted alike (conv_info = 1).
      comp = sum(masks[layer][k].sum() * cost[k] for layer in range(len(masks))
                 for k in range(n_cand)) / args.batch_size
      return F.cross_entropy(out, y) + 1e-3 * comp
  else:
    model = getattr(models, f"cifar10_resnet_{args.depth}")()
    bits, grad_bits = AUTHORS_STATIC[method]

    def loss_fn():
      return F.cross_entropy(model(x, bits, grad_bits), y)

  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()

  return step


def time_step(step, repeats: int, warmup: int = 2) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("system", choices=("plain", "authors"))
  parser.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                      help="plain: the memory format of activations and weights")
  parser.add_argument("--methods", nargs="+", default=["fp32", "static", "pfq", "dfq"],
                      help="authors: which of fp32, static, pfq, dfq to time")
  parser.add_argument("--authors-dir", default=None,
                      help="authors: a checkout of GATECH-EIC/FracTrain (holding fractrain_cifar/)")
  parser.add_argument("--depth", type=int, default=38, help="CIFAR ResNet depth, 6n+2 (default 38)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  if (args.depth - 2) % 6:
    parser.error(f"--depth={args.depth}; expected 6n+2, e.g. 20, 38, 74")
  torch.manual_seed(0)
  if args.system == "plain":
    runs = [(f"plain PyTorch {torch.__version__.split('+')[0]}, {args.layout}", "fp32",
             plain_step(args))]
  else:
    if not args.authors_dir or not os.path.isdir(os.path.join(args.authors_dir, "fractrain_cifar")):
      parser.error(f"--authors-dir={args.authors_dir!r}; expected a checkout of "
                   "GATECH-EIC/FracTrain holding fractrain_cifar/")
    bad = sorted(set(args.methods) - {"fp32", "static", "pfq", "dfq"})
    if bad:
      parser.error(f"--methods {' '.join(bad)}; expected some of fp32, static, pfq, dfq")
    runs = [(f"the authors' FracTrain code (PyTorch {torch.__version__.split('+')[0]})", m,
             authors_step(args, m)) for m in args.methods]
  for system, method, step in runs:
    times = time_step(step, args.repeats)
    print(json.dumps({"system": system, "method": method, "step_ms": statistics.median(times) * 1e3,
                      "min_step_ms": min(times) * 1e3, "repeats": args.repeats,
                      "threads": torch.get_num_threads()}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
