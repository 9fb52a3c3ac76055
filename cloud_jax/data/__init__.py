"""Preference data: rows -> tokens -> TFDS (array_record) -> grain batches.

    config.py        DataConfig (the top-level config's ``data`` section), layouts, buckets
    schema.py        row loading (JSONL / JSON / Parquet) and validation, lenient rejects
    tokenizer.py     HF tokenizer loading, the byte tokenizer, chat templates, end-of-turn ids
    layout.py        chat layout of a sequence: input ids, loss targets, reward index
    tfds_builder.py  tokenized pairs stored and reused as a TFDS dataset
    pipeline.py      per-host, bucketed, checkpointable numpy batches with grain

Typical use:

    tok = load_tokenizer(cfg.data.tokenizer)
    dataset = prepare_dataset(cfg.data, tok, layout="critique")
    batches = batch_iterator(cfg.data, open_split(dataset, "train"))
"""
