"""Adapters that give the harness one interface to both models: ``generate(spec, prompts, batch, seed)``.

* `ArGenerator`: the causal Mamba-2 LM baseline, ``dimba_jax.models.ar.generate`` (prefill of
  the prompt, then recurrent `step` decoding in one jitted `lax.scan`), nucleus sampling at
  ``temperature`` / ``top_p`` (defaults: config.ar.* if present, else 1.0 / 0.95). Unprompted
  samples start from the EOS id ("start of a document").
* `DimbaGenerator`: ``dimba_jax.diffusion.sampler.make_sample_fn`` (the same computation as
  ``sample``, one compiled function per setting) over one sequence
  [prompt | L_gen generated positions]; settings come from config.sample (eta, guidance, clamp,
  temperature, grid) and the model (self-conditioning), overridden by the spec's variant
  (`harness.VARIANTS`).
Both return int32 (batch, L_gen): the generated tokens only. Everything a call does is inside
`generate` (argument transfer, the jitted program, slicing off the prompt), so the harness times
what a caller waits for.

Pre-split fast path: the public wrappers re-split the nnx module into (graphdef, state) at every
call, a few milliseconds of Python for a 30M-parameter stack, which a serving loop would do once.
Both split once and call their program bound (`layers.bound.bind`: the graph and the state's
layout fixed, so a call hashes no GraphDef and passes few arrays): DIMBA's `make_sample_fn`,
and the AR generator's `ar.generate_bound` per generated length (the program its public wrapper
runs); the AR generator's first call of every new shape also runs the public wrapper and checks
the two results are identical; on any difference or error it falls back to the public wrapper
for good (``self.fast`` turns False).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def prng_key(seed: int):
    """`jax.random.PRNGKey(seed)`, built on the host where that is exact: the default
    threefry2x32 key of a seed in [0, 2**32) is the uint32 pair (0, seed), here a numpy array
    that the jitted program takes as one of its call's arguments (no device op of its own per
    call). Other seeds or PRNG implementations: `jax.random.PRNGKey(seed)`."""
    if 0 <= seed < 2 ** 32 and getattr(jax.config, "jax_default_prng_impl", None) == "threefry2x32":
        return np.array([0, seed], np.uint32)
    return jax.random.PRNGKey(seed)


class ArGenerator:
    """The AR baseline behind the harness interface (see module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, temperature: float = 1.0, top_p: float = 0.95):
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.eos_id = int(tokenizer.eos_id)
        self._graphdef, self._state = nnx.split(model)
        self.fast, self._checked, self._bound = True, set(), {}

    @classmethod
    def from_config(cls, model: Any, config: Any, tokenizer: Any) -> "ArGenerator":
        """Sampling settings from config.ar.temperature / top_p when the config has them."""
        from dimba_jax.models.ar import ar_setting

        return cls(model, tokenizer, temperature=ar_setting(config, "temperature", 1.0),
                   top_p=ar_setting(config, "top_p", 0.95))

    def generate(self, spec, prompts: np.ndarray | None, batch: int, seed: int) -> jax.Array:
        """int32 (batch, spec.L_gen) new tokens; prompts int32 (batch, P) or None (start at EOS)."""
        from dimba_jax.models import ar

        if prompts is None:
            prompts = np.full((batch, 1), self.eos_id, np.int32)
        if prompts.shape[0] != batch:
            raise ValueError(f"prompts have batch {prompts.shape[0]}, expected {batch}")
        rng = prng_key(seed)

        def public():
            return ar.generate(self.model, prompts, spec.L_gen, rng, temperature=self.temperature,
                               top_p=self.top_p)

        def fast():
            if spec.L_gen not in self._bound:
                self._bound[spec.L_gen] = ar.generate_bound(self._graphdef, self._state, spec.L_gen)
            run, params = self._bound[spec.L_gen]
            return run(params, jnp.asarray(prompts, jnp.int32), rng,
                       jnp.float32(self.temperature), jnp.float32(self.top_p))

        return _checked_fast(self, (prompts.shape, spec.L_gen), fast, public)


class DimbaGenerator:
    """DIMBA behind the harness interface (see module docstring).

    Args:
      model: a DimbaModel.
      config: its full config (config.diffusion for the schedule, config.sample for defaults).
      tokenizer: the model's tokenizer.
    """

    def __init__(self, model: Any, config: Any, tokenizer: Any):
        from dimba_jax.diffusion import sampler as sampling
        from dimba_jax.diffusion.schedule import schedule_from_config

        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.schedule = schedule_from_config(config.diffusion)
        self._samplers: dict = {}
        self.fast = True  # the pre-split path is the only path (make_sample_fn splits once)
        self.defaults = {k: v for k, v in sampling.sampler_options(config.sample).items()
                         if k not in ("steps", "sampler")}  # the spec names those
        self.defaults["self_condition"] = bool(getattr(model, "self_condition", False))

    def options(self, spec) -> dict:
        """Sampler keyword arguments of `spec`: config defaults overridden by its variant."""
        from dimba_jax.evaluate.harness import variant_options

        opts = dict(self.defaults)
        opts.update(variant_options(spec.variant))
        if not spec.prompted:
            opts["guidance"] = 1.0  # nothing to guide by: one forward per step
        if opts["self_condition"] and not self.defaults["self_condition"]:
            raise ValueError("variant asks for self-conditioning but the model was not trained with it")
        return opts

    def generate(self, spec, prompts: np.ndarray | None, batch: int, seed: int) -> jax.Array:
        """int32 (batch, spec.L_gen) generated tokens; prompts int32 (batch, P) known prefix or None."""
        from dimba_jax.diffusion import sampler as sampling

        p_len = 0 if prompts is None else int(prompts.shape[1])
        total = p_len + spec.L_gen
        tokens = np.zeros((batch, total), np.int32)
        known = np.zeros((batch, total), bool)
        if p_len:
            if prompts.shape[0] != batch:
                raise ValueError(f"prompts have batch {prompts.shape[0]}, expected {batch}")
            tokens[:, :p_len] = prompts
            known[:, :p_len] = True
        opts = self.options(spec)
        rng = prng_key(seed)

        key = (spec.steps, spec.sampler, tuple(sorted(opts.items())))
        if key not in self._samplers:  # one compiled sampler per setting, model split once
            self._samplers[key] = sampling.make_sample_fn(self.model, self.schedule, steps=spec.steps,
                                                          sampler=spec.sampler, **opts)
        ids, _ = self._samplers[key](tokens, known, rng)  # host arrays are the call's own arguments
        return ids[:, p_len:] if p_len else ids


def _checked_fast(gen, key, fast, public) -> jax.Array:
    """Runs `fast()`; the first time for `key`, also `public()` and requires identical results.

    On a mismatch or any error of the fast path, `gen.fast` becomes False and `public()` is used
    from then on (see the module docstring).
    """
    if not gen.fast:
        return public()
    if key in gen._checked:
        return fast()
    reference = np.asarray(public())
    try:
        out = fast()
        same = np.array_equal(np.asarray(out), reference)
    except Exception as e:  # noqa: BLE001 - any failure of the private path: use the public one
        print(f"[generators] pre-split fast path failed ({type(e).__name__}: {e}); using the public API")
        same = False
    if not same:
        print("[generators] pre-split fast path differs from the public API; using the public API")
        gen.fast = False
        return public()
    gen._checked.add(key)
    return out
