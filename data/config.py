"""Data knobs: which indexed datasets to read, how to blend and split them, and the sample shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class DataConfig:
    """Megatron indexed datasets (``<prefix>.bin/.idx``) blended and split into train/valid/test."""

    # Dataset prefixes (paths without .bin/.idx), as written by scripts/preprocess_data.py.
    prefixes: list[str] = field(default_factory=list)
    # Blend weights, one per prefix; None weights prefixes by their size.
    weights: list[float] | None = None
    # Document split between train, valid and test, e.g. "98,1,1".
    split: str = "98,1,1"
    # Tokens per sample (the clean half; the joint objective feeds 2 * seq_length to the model).
    seq_length: int = MISSING
    # Tokenizer folder (loads with transformers.AutoTokenizer); it must match the model's vocab.
    tokenizer: str = MISSING
    # Where megatron.core caches sample/shuffle indices; None -> "<first prefix dir>/cache".
    cache_dir: str | None = None
    # Restart position ids and restrict attention at every end-of-document token (packed documents).
    document_masks: bool = False
    # Drop the loss on end-of-document tokens.
    eod_mask_loss: bool = False
    # DataLoader worker processes.
    num_workers: int = 0
