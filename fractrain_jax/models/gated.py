"""A DFQ model (SPEC section 4): a backbone whose blocks each pick a precision per sample.

The gate decides block l's precision from the features entering block l (the
stem's output for block 0), so only L decisions are made and L heads built;
no head reads the last block's output. Two ways to run a gated block
(``FORWARDS``), with the same parameters, gate and cost accounting:

- ``"single"`` (the default, and the authors' ImageNet computation): block l's
  branch convs run once at ``GatedBits(mask[l], a=fw_candidates,
  g=bw_candidates, w=weight_bits)``, their inputs blending the K candidate
  quantizations by the mask (see ``layers.QConv``); shortcuts stay full
  precision. The gate's gradient comes through the blended inputs.
- ``"per_candidate"`` (the authors' CIFAR computation,
  fractrain_cifar/models.py:537-550): block l runs K times, once per
  candidate at ``StaticBits(a_k, g_k, weight_bits)``, its projection shortcut
  included (their ``downsample`` is built with the DFQ weight bits,
  models.py:485, and called with the block's bits, models.py:73-74), and the
  K outputs are blended by the mask. BatchNorm and the input ranges see each
  candidate's whole batch, in candidate order, and the gate's gradient comes
  from the block outputs. K times the compute of the single pass.

Stem, MobileNetV2's last 1x1 conv and the classifier are full precision in
both; depthwise convs stay at (8, 16, 8).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax import cost, quant
from fractrain_jax.layers import BRANCH, SHORTCUT, GatedBits, StaticBits
from fractrain_jax.models.backbone import Backbone, Plan
from fractrain_jax.models.gate import Gate
from fractrain_jax.models.parts import BlockBits, layer_key
from fractrain_jax.models.mobilenet_v2 import InvertedResidual
from fractrain_jax.models.residual import BasicBlock, Bottleneck

# SPEC section 4 and the README examples, by input size: (b_a, b_g candidates, b_w).
DEFAULT_CANDIDATES = {
    32: ((3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4),      # CIFAR
    224: ((3, 4, 6, 8), (6, 8, 12, 16), 6),          # ImageNet
}
# The authors' gate head by input size (models/gate.py); MobileNetV2 has its own.
DEFAULT_HEADS = {32: "cifar", 224: "imagenet"}
FORWARDS = ("single", "per_candidate")


def check_candidates(fw_candidates: Sequence[int], bw_candidates: Sequence[int],
                     weight_bits: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
  """The K (b_a, b_g) candidate pairs and the weight width, validated, as Python ints."""
  a, g, w = tuple(fw_candidates), tuple(bw_candidates), weight_bits
  if len(a) != len(g) or not a:
    raise ValueError(f"fw_candidates={a} and bw_candidates={g} must be non-empty and of "
                     "equal length (one (b_a, b_g) pair per candidate)")
  for what, widths in (("fw_candidates", a), ("bw_candidates", g), ("weight_bits", (w,))):
    for b in widths:
      if not quant.is_static(b):
        raise ValueError(f"{what}={widths}: bit widths must be Python ints")
      quant.check_bits(b, what)
  return tuple(int(b) for b in a), tuple(int(b) for b in g), int(w)


def forced_mask(force, num_candidates: int, shape: tuple[int, ...]) -> jax.Array:
  """Candidate ``force`` as a one-hot mask of ``shape + (K,)``; refuses a non-index."""
  if not (quant.is_static(force) and 0 <= force < num_candidates):  # A Python int, not a bool.
    raise ValueError(f"force={force!r}: expected a candidate index in 0..{num_candidates - 1}")
  one_hot = jax.nn.one_hot(int(force), num_candidates, dtype=jnp.float32)
  return jnp.broadcast_to(one_hot, tuple(shape) + (num_candidates,))


class Candidates:
  """What every gated model has: K ``(b_a, b_g)`` candidates and one weight width.

  A mixin of ``GatedModel`` and ``GatedTransformerLM``; they set
  ``fw_candidates``, ``bw_candidates`` and ``weight_bits`` (``check_candidates``).
  """
  fw_candidates: tuple[int, ...]
  bw_candidates: tuple[int, ...]
  weight_bits: int

  @property
  def num_candidates(self) -> int:
    return len(self.fw_candidates)

  def candidate_bits(self) -> tuple[StaticBits, ...]:
    """Candidate k as a static precision: ``StaticBits(a_k, g_k, weight_bits)``."""
    return tuple(StaticBits(a=a, g=g, w=self.weight_bits)
                 for a, g in zip(self.fw_candidates, self.bw_candidates))

  def block_bits(self, mask: jax.Array) -> GatedBits:
    """A block's precision from its mask (per sample or per token)."""
    return GatedBits(mask, a=self.fw_candidates, g=self.bw_candidates, w=self.weight_bits)


def authors_gate_head(backbone: Backbone) -> str:
  """The gate head the authors build for this backbone (a ``gate.HEADS`` key)."""
  if isinstance(backbone.blocks[0], InvertedResidual):
    return "mobilenet"
  return DEFAULT_HEADS[backbone.image_size]


def per_candidate_block(block: nnx.Module, h: jax.Array, mask: jax.Array,
                        candidates: Sequence[StaticBits], depthwise, *,
                        key: jax.Array | None) -> jax.Array:
  """The authors' CIFAR block: ``sum_k mask[:, k] * block(h, candidate k)``.

  Every candidate pass quantizes the branch and the projection shortcut at
  ``candidates[k]``, and rounds its gradients with its own key (``key``
  folded with k), as the authors' separate calls draw separate noise.
  """
  if isinstance(block, (BasicBlock, Bottleneck)) and block.shortcut is not None:
    # The authors' ResNets also run the projection shortcut once at full
    # precision (models.py:529-530), for a 0-bit "skip" candidate; none is
    # configured here, so the output is unused, but the call updates the
    # shortcut BN's running statistics, and that is kept. (Their MobileNetV2,
    # models.py:791-796, has no such call.)
    block.shortcut(h, None, key=None)
  out = None
  for k, bits in enumerate(candidates):
    y = block(h, BlockBits(branch=bits, shortcut=bits, depthwise=depthwise),
              key=layer_key(key, k))
    term = mask[:, k].reshape((-1,) + (1,) * (y.ndim - 1)) * y
    out = term if out is None else out + term
  return out


class GatedModel(Candidates, nnx.Module):
  """``model(x, *, key=None, tau=1.0, force=None) -> (logits, masks)``.

  Candidates and gate head default by input size: CIFAR (3,4,4,6,6) /
  (6,6,8,8,12) with 4-bit weights and the CIFAR head, ImageNet (3,4,6,8) /
  (6,8,12,16) with 6-bit weights and the ImageNet head (MobileNetV2: its own
  head, ``authors_gate_head``).
  """

  task = "classify"

  def __init__(self, backbone: Backbone, *, fw_candidates: Sequence[int] | None = None,
               bw_candidates: Sequence[int] | None = None, weight_bits: int | None = None,
               gate: str = "gumbel", gate_head: str | None = None, gate_init: str = "default",
               forward: str = "single", rngs: nnx.Rngs):
    """gate: "gumbel" (straight-through Gumbel-softmax) or "hard" (the authors' argmax).
    gate_head: a ``gate.HEADS`` layout; None picks the authors' one (``authors_gate_head``).
    gate_init: the gate's initialization, one of ``gate.INITS``.
    forward: how a gated block runs, one of ``FORWARDS`` (see the module docstring).
    """
    if forward not in FORWARDS:
      raise ValueError(f"forward={forward!r}; expected one of {FORWARDS}")
    default_a, default_g, default_w = DEFAULT_CANDIDATES[backbone.image_size]
    a, g, w = check_candidates(default_a if fw_candidates is None else fw_candidates,
                               default_g if bw_candidates is None else bw_candidates,
                               default_w if weight_bits is None else weight_bits)
    self.backbone = backbone
    self.fw_candidates, self.bw_candidates, self.weight_bits = a, g, w
    self.forward_mode = forward
    head = authors_gate_head(backbone) if gate_head is None else gate_head
    self.gate_head = head
    blocks = backbone.blocks
    # Decision l reads what enters block l: the stem for l = 0, block l-1 after that.
    read = [backbone.stem.out_features] + [blocks[l].out_features
                                           for l in range(len(blocks) - 1)]
    self.gate = Gate(read, len(a), sampler=gate, head=head, init=gate_init, rngs=rngs)

  @property
  def image_size(self) -> int:
    return self.backbone.image_size

  @property
  def num_blocks(self) -> int:
    return self.backbone.num_blocks

  def layer_macs(self) -> list[cost.LayerMACs]:
    """The backbone's layers captured from one abstract pass, labelled as this model runs them.

    MACs do not depend on precision or on the gate (which is no conv), so the
    plain backbone's full-precision pass finds the same layers as this one.
    The per-candidate forward runs projection shortcuts at the block's choice,
    so there they are charged to the block as well. Either way a step is
    charged for the chosen candidate only, as the paper counts it, not for the
    K passes the per-candidate forward computes.
    """
    roles = (BRANCH, SHORTCUT) if self.forward_mode == "per_candidate" else (BRANCH,)
    return self.backbone.layer_macs(gated=roles)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None, tau=1.0,
               force: int | None = None, full_precision: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Logits and the masks ``(num_blocks, batch, K)``, one-hot in the forward pass.

    key: split into (Gumbel noise, gradient rounding); the rounding key is used
      exactly as ``Backbone.forward`` uses its key, so a plain backbone given
      it rounds the same way.
    tau: Gumbel-softmax temperature (traced: changing it does not recompile).
    force: candidate index given to every block and sample (the gate is not run).
    full_precision: every conv in FP32, depthwise too (SPEC section 5's
      fine-tuning); the gate still runs and its masks are returned, unused.
    """
    batch = x.shape[0]
    forced = None if force is None else forced_mask(force, self.num_candidates, (batch,))
    noise_key, round_key = (None, None) if key is None else jax.random.split(key)
    backbone = self.backbone
    # Everything outside the branches as the plan has it; the branches are set below.
    plan = (Plan.static(None, self.num_blocks) if full_precision
            else Plan.blockwise([None] * self.num_blocks))
    stem_key, block_keys, head_key = backbone.part_keys(round_key)
    h = backbone.stem(x, plan.outer, key=stem_key)
    state = self.gate.initial_state(batch)
    masks = []
    for index, block in enumerate(backbone.blocks):
      if forced is None:
        mask, state = self.gate(index, h, state, key=layer_key(noise_key, index), tau=tau)
      else:
        mask = forced
      masks.append(mask)
      bits = plan.block_bits(index)
      if full_precision:
        h = block(h, bits, key=block_keys[index])
      elif self.forward_mode == "per_candidate":
        h = per_candidate_block(block, h, mask, self.candidate_bits(), bits.depthwise,
                                key=block_keys[index])
      else:
        h = block(h, dataclasses.replace(bits, branch=self.block_bits(mask)),
                  key=block_keys[index])
    return backbone.head(h, plan.outer, key=head_key), jnp.stack(masks)
