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
    # Held-out prefixes (weighted by size) for validation; when set, `prefixes` feed training only,
    # `split` is not used and there is no test set.
    valid_prefixes: list[str] = field(default_factory=list)
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

    def validate(self) -> None:
        """Checks that need no files; raises ValueError naming the key (data.<key>)."""
        if not self.prefixes:
            raise ValueError(
                "data.prefixes is empty; list the dataset prefixes written by scripts/preprocess_data.py"
            )
        if self.weights is not None:
            if len(self.weights) != len(self.prefixes):
                raise ValueError(
                    f"data.weights has {len(self.weights)} values for {len(self.prefixes)} data.prefixes; "
                    f"give one weight per prefix or null"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"data.weights={list(self.weights)} must be >= 0 with a positive sum")
        parts = self.split.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
            raise ValueError(
                f"data.split={self.split!r} must be up to 3 comma-separated non-negative weights for "
                f"train,valid,test with a positive sum, e.g. '98,1,1'"
            )
        shared = sorted(set(self.prefixes) & set(self.valid_prefixes))
        if shared:
            raise ValueError(
                f"data.valid_prefixes repeats training prefixes {shared}: validation would see training data"
            )
        if self.seq_length < 1:
            raise ValueError(f"data.seq_length={self.seq_length} must be >= 1")
