"""dimba_jax.data: tokenizers, document sources and grain input pipelines.

  tokenizers.py  `get_tokenizer("byte" | "bpe" | "bpe_2048" | "bpe:PATH")` -> encode / decode / vocab_size / eos_id
  sources.py     `open_source("embedded" | "files:GLOB" | "tfds:NAME[:SPLIT]", split=...)` -> documents
  pipeline.py    `make_train_iterator(config.data, tokenizer, global_batch_size=, seed=,
                  process_index=, process_count=)` -> grain iterator of {"tokens": int32 (B/P, L)};
                 `make_eval_batches(...)`; `build_tokenizer_and_data(config)`
  assets/        the packaged BPE vocabulary and the embedded corpus (see assets/README.md)
"""
