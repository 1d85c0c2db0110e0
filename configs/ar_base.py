"""ar_base: the autoregressive baseline at the 130M class — a causal Mamba-2 LM with the
architecture of mamba_ssm's "130M" Mamba-2 (d_model 768, 24 layers, d_state 128, headdim 64):
configs/base.py with a causal task, so it sees base's data, tokenizer, batch and schedule.

Launch manual
-------------
Data as in configs/base.py (`$DIMBA_DATA`, default `.gpu/data`, or --config.data.source=...).
    python -m dimba_jax.main --config configs/ar_base.py --workdir runs/ar_base
Throughput / MFU beside DIMBA base and mamba_ssm (no data needed, synthetic tokens):
    python -m benchmarks.vs_mamba_ssm --help
    python benchmarks/train_throughput.py --config configs/ar_base.py --steps 20

Model: d_model 768, 24 causal Mamba-2 blocks (headdim 64, d_state 128, expand 2, conv 4, one
group), tied head: 96.66M parameters with the 8192-token BPE, i.e. mamba_ssm's 130M body
(90.37M) plus an 8192 x 768 embedding; with mamba_ssm's 50,280-row vocabulary it is 129.0M.
DIMBA base has 130.8M (its blocks are bidirectional and FiLM-conditioned).
"""

from dimba_jax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "base")  # same data, tokenizer, batch, steps and schedule
    c.task = "ar"
    c.model.bidirectional = False  # 24 causal blocks, as mamba_ssm's 130M
    return c
