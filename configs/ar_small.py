"""ar_small: the autoregressive baseline for configs/small.py — a causal Mamba-2 LM with the
same parameter count (~32.3M vs DIMBA small's ~33.2M), tokenizer, data, batch and steps: it is
configs/small.py with a causal task and 17 blocks, so the two see the same tokens by construction;
it trains at learning rate 2e-3, the rate it was measured at (DIMBA small trains at 4e-3).

Launch manual
-------------
Data as in configs/small.py (`$DIMBA_DATA`, default `.gpu/data`, or --config.data.source=...).
    python -m dimba_jax.main --config configs/ar_small.py --workdir runs/ar_small
    python -m dimba_jax.main --workdir runs/ar_small --mode sample --prompt "It was a dark" --length 256
    python -m dimba_jax.main --workdir runs/ar_small --mode eval
Same tokens seen as DIMBA small: keep train.steps x train.batch_size x data.seq_len equal.
Sampling: config.ar.temperature / config.ar.top_p (recurrent decoding in one jitted scan).

Model: d_model 512, 17 causal Mamba-2 blocks (headdim 64, d_state 64), tied head.
"""

from dimba_jax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "small")  # same data, tokenizer, batch, steps and schedule
    c.task = "ar"
    c.model.n_layers = 17  # ~32M parameters: as many as DIMBA small's 12 bidirectional blocks
    c.model.bidirectional = False
    c.model.posterior_input = False  # a DIMBA stem's input; the AR model has none
    c.train.lr = 2e-3
    return c
