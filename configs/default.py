"""FP32 ResNet-38 on CIFAR-10, the paper's recipe (SPEC section 6): every key at its default.

SGD with momentum 0.9, weight decay 1e-4, lr 0.1, batch 128, 64,000
iterations with lr x0.1 at 32,000 and 48,000. The keys, their defaults and a
comment for each live in ``fractrain_jax/defaults.py`` (the library's
schema); the recipe files here start from this one.

Run: ``python main.py --config configs/default.py --workdir /tmp/fp32``;
any key can be overridden, e.g. ``--config.train.iters=2000``.
"""

from fractrain_jax.defaults import get_config

__all__ = ["get_config"]
