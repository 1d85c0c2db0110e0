"""The training loop, top to bottom: setup, restore, loop, save, samples, eval.

    from dimba_jax.train.loop import train_and_evaluate
    summary = train_and_evaluate(config, "runs/tiny")

The loop knows the model only through the `Task` interface (init_model / loss / sample_text /
flops_per_token). Everything is sharded over a (data, fsdp, tensor) mesh; every process feeds
its own rows of the global batch; checkpoints hold the params, optimizer state, EMA, step, RNG
and every process's data-iterator state, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import distributed
from dimba_jax.models import flops as flops_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import metrics as metrics_lib
from dimba_jax.train import optim
from dimba_jax.train import state as state_lib
from dimba_jax.train import step as step_lib
from dimba_jax.train.preemption import PreemptionWatcher
from dimba_jax.train.tasks import make_task, make_tokenizer

_log = logging.getLogger(__name__)

# A data factory: (config, tokenizer, process_index, process_count) -> iterator of local batches
# with get_state()/set_state(). The default is dimba_jax.data.pipeline.make_train_iterator.
DataFactory = Callable[[Any, Any, int, int], Any]


def validate_config(config, num_processes: int, batch_shards: int) -> None:
    """Checks the numbers the loop relies on; raises ValueError naming the bad field."""
    t = config.train
    if int(t.steps) <= 0:
        raise ValueError(f"train.steps must be > 0, got {t.steps}")
    if int(t.grad_accum) < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {t.grad_accum}")
    b, a = int(t.batch_size), int(t.grad_accum)
    if b <= 0 or b % a:
        raise ValueError(f"train.batch_size={b} must be a positive multiple of grad_accum={a}")
    if b % num_processes:
        raise ValueError(f"train.batch_size={b} must be divisible by the {num_processes} processes")
    if (b // a) % batch_shards:
        raise ValueError(f"train.batch_size / grad_accum = {b // a} must be divisible by the "
                         f"{batch_shards} batch shards of the mesh (data x fsdp)")
    if int(t.ema_every) < 1:
        raise ValueError(f"train.ema_every must be >= 1, got {t.ema_every}")
    for name in ("checkpoint_every", "log_every", "sample_every", "eval_every"):
        if int(t[name]) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {t[name]}")


def _default_data(config, tokenizer, process_index, process_count):
    from dimba_jax.data.pipeline import make_train_iterator
    return make_train_iterator(config.data, tokenizer, global_batch_size=int(config.train.batch_size),
                               seed=int(config.seed), process_index=process_index,
                               process_count=process_count)


def _default_eval(config, tokenizer, process_index, process_count):
    from dimba_jax.data.pipeline import make_eval_batches
    n = int(config.train.eval_batches)
    if n <= 0:
        return []
    return make_eval_batches(config.data, tokenizer, int(config.train.batch_size), n,
                             int(config.data.seq_len), process_index=process_index,
                             process_count=process_count)


def local_copy(tree: Any, mesh) -> Any:
    """A fully replicated, single-device copy of a (possibly sharded, multi-process) pytree, for
    host-side work such as sampling. All processes must call it together."""
    if tree is None:
        return None
    repl = mesh_lib.replicated(mesh)
    replicated = jax.jit(lambda x: x, out_shardings=repl)(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), replicated)


def _sample(task, parts, params, rest, mesh, seed: int, step: int, num: int) -> list[str]:
    model = parts.merge(local_copy(params, mesh), local_copy(rest, mesh))
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1_000_003 + step)
    return task.sample_text(model, rng, num)


def _evaluate(eval_step, params, rest, batches, data_sharding, seed: int) -> dict[str, float]:
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    sums: dict[str, float] = {}
    for local in batches:
        out = jax.device_get(eval_step(params, rest, step_lib.global_batch(local, data_sharding), rng))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}


def train_and_evaluate(config, workdir: str, *, task=None, data_factory: DataFactory | None = None,
                       eval_factory: DataFactory | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    Args:
      config: a full config (dimba_jax.config.default_config() shape).
      workdir: output directory: config.json, checkpoints/, metrics.jsonl, tensorboard/,
        samples.txt. An existing run there is resumed; config.json always records the settings
        trained with (changed ones are logged and written). Nothing is written before the task
        and the data pipeline are built.
      task: a Task; default `make_task(config)` from config.task.
      data_factory / eval_factory: override the data pipeline (tests); see DataFactory.
    Returns:
      {"step": final step, "start_step": step resumed from, "preempted": bool,
       "last_metrics": dict of the last logged train metrics, "eval": dict or {},
       "num_params": int, "samples": list[str]}
    Raises:
      NonFiniteError: a step produced a non-finite loss/gradient (nothing of it is saved).
      ValueError: inconsistent config (batch vs mesh, steps <= 0, ...).
    """
    # =============================================================== setup
    distributed.initialize_distributed(config.mesh)
    is_main = distributed.is_main_process()
    pid, nproc = jax.process_index(), jax.process_count()
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.rules_dict(config.mesh.axis_rules)
    validate_config(config, nproc, mesh_lib.batch_shards(rules, mesh))
    ckpt_lib.check_config(workdir, config)  # reads only: nothing is written before the data runs

    t = config.train
    tokenizer = getattr(task, "tokenizer", None) if task is not None else make_tokenizer(config)
    task = task if task is not None else make_task(config, tokenizer)
    seed, total_steps = int(config.seed), int(t.steps)
    use_ema = float(t.ema_decay) > 0
    param_dtype = jnp.dtype(t.param_dtype)

    parts = state_lib.model_parts(task, jax.random.PRNGKey(seed))
    layout = state_lib.param_layout(parts, t, mesh, config.mesh.axis_rules)
    tx = state_lib.optimizer_for(parts, t, layout)
    shardings, rest_shardings = state_lib.state_shardings(parts, tx, mesh, config.mesh.axis_rules,
                                                          param_dtype, use_ema, layout)
    to_saved, to_training = state_lib.form_converters(layout, shardings)
    data_sharding = step_lib.batch_sharding(mesh, config.mesh.axis_rules)
    train_step = step_lib.make_train_step(task, parts, tx, t, mesh, shardings, rest_shardings,
                                          data_sharding, layout)
    eval_step = step_lib.make_eval_step(task, parts, mesh, shardings.params, rest_shardings,
                                        data_sharding, layout)
    as_tree = (lambda p: p) if layout is None else jax.jit(layout.unravel)
    param_norm = jax.jit(optim.global_norm)  # a logging quantity: logging steps only
    # The data pipeline is built before anything is written: a start that fails here (a bad
    # data source, say) leaves the workdir as it was.
    train_iter = (data_factory or _default_data)(config, tokenizer, pid, nproc)
    ckpt_lib.write_config(workdir, config)
    ckpt_lib._sync("dimba_config_written")
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(t.keep_checkpoints),
                                         async_save=bool(t.async_checkpointing))
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)

    seq_len = int(config.data.seq_len)
    tokens_per_step = int(t.batch_size) * seq_len
    try:
        flops_per_token = float(task.flops_per_token(seq_len))
    except (AttributeError, NotImplementedError):
        flops_per_token = None
    peak = flops_lib.peak_flops_per_device(jax.devices()[0], float(t.peak_flops))

    # =============================================================== restore
    abstract = state_lib.abstract_train_state(parts, tx, shardings, param_dtype, use_ema, layout)
    restored = checkpointer.restore(abstract)
    if restored is None:
        state, rest = state_lib.create_train_state(task, parts, tx, seed, shardings,
                                                   rest_shardings, param_dtype, use_ema, layout)
        start_step = 0
    else:
        state, start_step = to_training(restored.state), restored.step
        rest = state_lib.init_rest(task, parts, seed, rest_shardings)
        if restored.data_state is not None:
            train_iter.set_state(restored.data_state)
        else:
            _log.warning("checkpoint %d has no data-iterator state for process %d of %d (saved "
                         "with another process count): the data stream restarts", start_step,
                         pid, nproc)
        _log.info("resumed from step %d", start_step)
    num_params = state_lib.count_params(abstract.params)
    if is_main:
        _log.info("model: %s parameters; mesh %s; %d processes; %s tokens/step",
                  f"{num_params:,}", dict(mesh.shape), nproc, f"{tokens_per_step:,}")

    # =============================================================== loop
    summary: dict[str, Any] = {"start_step": start_step, "preempted": False, "last_metrics": {},
                               "eval": {}, "num_params": num_params, "samples": []}
    eval_batches = None
    watcher = PreemptionWatcher(checkpointer)
    bar = metrics_lib.ProgressBar(total_steps, initial=min(start_step, total_steps), enabled=is_main)
    pending = None  # (step, metrics, health) of the newest step, checked one step late
    last_saved = start_step if restored is not None else None
    window_start, window_steps = None, 0

    leaf_names = step_lib.param_leaf_names(abstract.params)

    def check(entry):
        if entry is not None:
            step_lib.raise_if_nonfinite(*entry, leaf_names)

    def save(step_done):
        nonlocal last_saved
        if last_saved == step_done:
            return
        check(pending)  # never checkpoint a state produced by a non-finite step
        checkpointer.save(step_done, to_saved(state), train_iter.get_state())
        last_saved = step_done

    def run_eval(step_done):
        nonlocal eval_batches
        if eval_batches is None:
            eval_batches = (eval_factory or _default_eval)(config, tokenizer, pid, nproc)
        if not eval_batches:
            return {}
        params = state.ema if state.ema is not None else state.params
        result = _evaluate(eval_step, params, rest, eval_batches, data_sharding, seed)
        writer.write(step_done, result, split="eval")
        bar.write(f"step {step_done} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
        return result

    def run_samples(step_done):
        if int(config.sample.num_samples) <= 0:
            return []
        params = as_tree(state.ema if state.ema is not None else state.params)
        samples = _sample(task, parts, params, rest, mesh, seed, step_done,
                          int(config.sample.num_samples))
        text = metrics_lib.write_samples(workdir, step_done, samples, enabled=is_main)
        if is_main:
            _log.info("samples at step %d:\n%s", step_done, text)
        return samples

    step_done = start_step
    try:
        for step_done in range(start_step + 1, total_steps + 1):
            local = next(train_iter)
            batch = step_lib.global_batch(local, data_sharding)
            if step_done == start_step + 1:  # all step variants at once, not each at its first draw
                step_lib.compile_variants(train_step, state, rest, batch,
                                          step_lib.step_option_sets(task))
            state, metrics, health = train_step(state, rest, batch,
                                                step_lib.step_options(task, step_done))
            check(pending)
            pending = (step_done, metrics, health)

            if window_start is None:  # the first step includes compilation: not timed
                jax.block_until_ready(metrics["loss"])
                window_start, window_steps = time.perf_counter(), 0
            else:
                window_steps += 1
            is_last = step_done == total_steps
            if (t.log_every and step_done % int(t.log_every) == 0) or is_last:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                if window_steps > 0:
                    step_time = (now - window_start) / window_steps
                    values["step_time_s"] = step_time
                    values["tokens_per_s"] = tokens_per_step / step_time
                    if flops_per_token:
                        values["mfu"] = flops_lib.mfu(values["tokens_per_s"], flops_per_token,
                                                      jax.device_count(), peak)
                values["param_norm"] = float(jax.device_get(param_norm(state.params)))
                window_start, window_steps = time.perf_counter(), 0  # the norm is not timed
                check(pending)
                writer.write(step_done, values)
                summary["last_metrics"] = values
                shown = {k: values[k] for k in sorted(values)
                         if k not in ("param_norm", "step_time_s") and values[k] is not None}
                bar.update(0, **shown)
            bar.update(1)

            stop = watcher.should_stop(step_done)
            if stop or is_last or (t.checkpoint_every and step_done % int(t.checkpoint_every) == 0):
                save(step_done)
            if stop:
                bar.write(f"preempted: saved step {step_done}; exiting")
                summary["preempted"] = True
                break
            if t.sample_every and step_done % int(t.sample_every) == 0 and not is_last:
                run_samples(step_done)
            if t.eval_every and step_done % int(t.eval_every) == 0 and not is_last:
                summary["eval"] = run_eval(step_done)
        check(pending)
    except BaseException:
        checkpointer.wait()  # let good saves already started finish before raising
        bar.close()
        watcher.restore()
        raise

    # =============================================================== save
    if not summary["preempted"] and step_done > 0:
        save(step_done)
    checkpointer.wait()
    bar.close()
    watcher.restore()

    # =============================================================== samples + eval
    if not summary["preempted"] and step_done > 0:
        summary["samples"] = run_samples(step_done)
        summary["eval"] = run_eval(step_done)
    writer.close()
    checkpointer.close()
    summary["step"] = step_done
    return summary
