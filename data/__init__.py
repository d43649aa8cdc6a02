"""Tandem's data side, independent of the model: tokenizers (tokenizer), document sources (sources),
preprocessing into Megatron indexed datasets (preprocess, metadata), the bundled demo corpora (corpora)
and the blended, split datasets the trainer reads (dataset, config)."""
