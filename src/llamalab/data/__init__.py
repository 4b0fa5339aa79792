"""Data: where records come from, what they must hold, how they become batches. Knows the
tokenizer, never a stage.

- raw rows from files, Parquet, `datasets` and `hf:` (``sources``); record schemas and their
  checks (``formats``); the one user-data exception (``errors``); label conventions shared with
  the losses: ``IGNORE_INDEX``, rating names and parsing (``labels``);
- pretraining text: streamed sources (``text_stream``), cleaning (``clean``), preparation into
  litdata shards (``prepare``, ``prepare_cli``, ``prepare_cache``), the weighted mixture of
  prepared sources (``shards``) and its datamodule (``pretrain``); ``corpus`` holds the built-in
  corpus and tokenizer, ``tokens`` the tokenizer's sha256;
- SFT, preference and prompt datamodules (``sft``, ``preference``, ``prompts``) on a resumable,
  sharded data order (``sampling``);
- the built-in data (``builtin`` package, made from ``stdlib_docs``) and its ground truth
  (``judge``).
"""
