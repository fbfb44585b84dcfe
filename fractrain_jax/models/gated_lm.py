"""DFQ for the Transformer LM: a causal gate that picks a precision per token and per sublayer.

Each attention sublayer and each MLP sublayer of ``TransformerLM`` (each has
its own residual add, as a CNN's residual block has) is a gated block:
before sublayer ``s`` the gate reads every token's residual-stream state
(no pooling across positions), steps one LSTM cell whose state is carried
from sublayer to sublayer per token, and picks one of K ``(b_a, b_g)``
candidates per token. The sublayer's quantized matmuls (Q/K/V/output
projections, the two MLP matmuls) then quantize each token's row of their
input at that token's ``b_a`` and each token's row of their output gradient
at its ``b_g`` (``layers.GatedBits`` with a ``(batch, positions, K)`` mask);
ranges stay per tensor.

Causality: a token's features depend on it and the tokens before it only,
and its gate state on its own features only, so its choices (and so its
logits) never depend on a later token. In evaluation this holds exactly; in
training, a quantized layer's per-tensor range spans the whole batch (as it
does for the plain LM, docs/DESIGN.md).

Only the single-pass forward exists (``forward="single"``): the authors'
per-candidate forward is CIFAR CNN code, and a per-token gate has no
per-sample block output to blend.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax import cost
from fractrain_jax.layers import BRANCH
from fractrain_jax.models.gate import Gate
from fractrain_jax.models.gated import Candidates, check_candidates, forced_mask
from fractrain_jax.models.parts import layer_key
from fractrain_jax.models.transformer_lm import TransformerLM

# The PFQ LM recipe's stages (4/6, 6/8, 8/8) as the gate's candidates, weights
# at 8 bits (configs/fp32_wikitext103.py, which every LM recipe starts from).
DEFAULT_CANDIDATES = ((4, 6, 8), (6, 8, 8), 8)
DEFAULT_HEAD = "lm"


class GatedTransformerLM(Candidates, nnx.Module):
  """``model(tokens, *, key=None, tau=1.0, force=None, full_precision=False) -> (logits, masks)``.

  masks: ``(num_blocks, batch, positions, K)``, one-hot in the forward pass;
  the gated blocks are the LM's sublayers (``num_blocks = 2 * depth``).
  """

  task = "lm"

  def __init__(self, lm: TransformerLM, *, fw_candidates: Sequence[int] | None = None,
               bw_candidates: Sequence[int] | None = None, weight_bits: int | None = None,
               gate: str = "gumbel", gate_head: str | None = None, gate_init: str = "default",
               forward: str = "single", rngs: nnx.Rngs):
    """Options as ``GatedModel``'s; gate_head None is the ``"lm"`` layout."""
    if forward != "single":
      raise ValueError(f"forward={forward!r}: the gated Transformer LM runs 'single' only "
                       "(the per-candidate forward is the authors' CIFAR CNN computation)")
    default_a, default_g, default_w = DEFAULT_CANDIDATES
    a, g, w = check_candidates(default_a if fw_candidates is None else fw_candidates,
                               default_g if bw_candidates is None else bw_candidates,
                               default_w if weight_bits is None else weight_bits)
    self.lm = lm
    self.fw_candidates, self.bw_candidates, self.weight_bits = a, g, w
    self.forward_mode = forward
    self.gate_head = DEFAULT_HEAD if gate_head is None else gate_head
    self.gate = Gate([lm.width] * lm.num_sublayers, len(a), sampler=gate, head=self.gate_head,
                     init=gate_init, per_token=True, rngs=rngs)

  @property
  def num_blocks(self) -> int:
    return self.lm.num_sublayers

  @property
  def context(self) -> int:
    return self.lm.context

  def layer_macs(self) -> list[cost.LayerMACs]:
    """The LM's matmuls, the quantized ones charged to their sublayer's choice."""
    return self.lm.layer_macs(gated=(BRANCH,))

  def __call__(self, tokens: jax.Array, *, key: jax.Array | None = None, tau=1.0,
               force: int | None = None, full_precision: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Next-token logits and the per-token masks.

    key: split into (Gumbel noise, gradient rounding); the rounding key is
      used as ``TransformerLM.forward`` uses its key, so the plain LM given it
      rounds the same way.
    tau: Gumbel-softmax temperature (traced: changing it does not recompile).
    force: candidate index given to every sublayer and token (the gate is not run).
    full_precision: every matmul in FP32 (fine-tuning); the gate still runs
      and its masks are returned, unused.
    """
    forced = None if force is None else forced_mask(force, self.num_candidates, tokens.shape)
    noise_key, round_key = (None, None) if key is None else jax.random.split(key)
    h = self.lm.embed_tokens(tokens, key=round_key)
    state = self.gate.initial_state(tokens.shape)
    masks = []
    for index in range(self.num_blocks):
      if forced is None:
        mask, state = self.gate(index, h, state, key=layer_key(noise_key, index), tau=tau)
      else:
        mask = forced
      masks.append(mask)
      bits = None if full_precision else self.block_bits(mask)
      h = self.lm.sublayer(index, h, bits, key=round_key)
    return self.lm.output(h), jnp.stack(masks)
