"""dimba_jax.train: the sharded, resumable trainer (generic over `task.Task`).

  tasks.py        config.task -> a Task of dimba_jax.tasks (with a frozen-encoder donor run)
  distributed.py  jax.distributed.initialize from flags or the cluster environment
  mesh.py         the (data, fsdp, tensor) mesh; logical axis names -> PartitionSpecs
  optim.py        AdamW + warm-up/cosine, clipping, weight-decay mask, EMA
  state.py        TrainState, sharded creation, restore targets
  step.py         jitted train/eval steps, global batches, the non-finite guard
  checkpoint.py   orbax checkpoints (async, keep N, data-iterator state, corrupt fallback), config.json
  preemption.py   SIGTERM -> save at the step boundary -> exit 0
  metrics.py      metrics.jsonl, TensorBoard, progress bar, samples.txt
  loop.py         train_and_evaluate(config, workdir): the loop, top to bottom
  restore.py      a task's model with a workdir's checkpoint weights (newest readable)
  inference.py    load_run (the one loader) / generate_text / evaluate_model (sample & eval modes)
  overrides.py    config files and --config.a.b=value overrides
"""
