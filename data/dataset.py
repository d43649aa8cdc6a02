"""The reading side: blended, split, shuffled samples of ``seq_length`` tokens through megatron.core.

``check_data`` refuses, before any work, data that cannot serve the model (missing or unfinished
prefixes, another vocabulary or mask id, a split part with no document). ``build_datasets`` then builds
train/valid/test with BlendedMegatronDatasetBuilder + GPTDataset, caching their indices in ``cache_dir``;
under torch.distributed, rank 0 builds the caches while the other ranks wait at a barrier.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from data.config import DataConfig
from data.metadata import DataError, DatasetMetadata
from data.tokenizer import TokenizerInfo

SPLIT_NAMES = ("train", "valid", "test")


def check_data(cfg: DataConfig, vocab_size: int, mask_id: int | None = None) -> dict[str, DatasetMetadata]:
    """Metadata of every prefix in ``cfg``, checked against the model's ``vocab_size`` and ``mask_id``."""
    cfg.validate()
    metadata = {prefix: DatasetMetadata.read(prefix) for prefix in [*cfg.prefixes, *cfg.valid_prefixes]}
    for prefix, meta in metadata.items():
        meta.check_files(prefix)
        tok = meta.tokenizer
        if tok.vocab_size != vocab_size:
            raise DataError(
                f"{prefix} was tokenized with a vocabulary of {tok.vocab_size} ({tok.path}) but the model's "
                f"vocab_size is {vocab_size}; preprocess it with the model's tokenizer, or set "
                f"model.vocab_size={tok.vocab_size}"
            )
        if mask_id is not None and tok.mask_id != mask_id:
            raise DataError(
                f"{prefix} records mask id {tok.mask_id} ({tok.mask_source} of {tok.path}) but the model "
                f"uses mask id {mask_id}; make them agree (objective.mask_token_id, or --mask-id when "
                f"preprocessing)"
            )
    by_tokenizer: dict[str, list[str]] = {}
    for prefix, meta in metadata.items():
        by_tokenizer.setdefault(meta.tokenizer.fingerprint, []).append(f"{prefix} ({meta.tokenizer.path})")
    if len(by_tokenizer) > 1:
        groups = "; ".join(", ".join(group) for group in by_tokenizer.values())
        raise DataError(f"the data prefixes were tokenized with different tokenizers: {groups}")
    if not cfg.valid_prefixes:
        _check_split(cfg.split, {p: metadata[p] for p in cfg.prefixes})
    return metadata


def _check_split(split: str, metadata: dict[str, DatasetMetadata]) -> None:
    # megatron.core loops forever looking for tokens in a split part that received no document.
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix, meta in metadata.items():
        n = meta.documents
        for name, bounds in zip(SPLIT_NAMES, matrix, strict=True):
            # The same rounding as BlendedMegatronDatasetBuilder, which splits by document.
            if bounds is not None and round(bounds[1] * n) - round(bounds[0] * n) == 0:
                raise DataError(
                    f"data.split={split!r} gives 0 of the {n} documents of {prefix} to {name}; set the "
                    f"{name} part to 0, raise it, or preprocess more documents"
                )


def build_datasets(
    cfg: DataConfig,
    num_samples: tuple[int, int, int],
    seed: int,
    tokenizer: TokenizerInfo,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[PackedSequenceDataset | None, PackedSequenceDataset | None, PackedSequenceDataset | None]:
    """Train, valid and test datasets of ``num_samples`` samples each (None for a part with no data).

    ``is_built_on_rank``: megatron.core's hook, False on ranks that receive data another way (e.g. tensor
    parallel ranks other than 0); they get None.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    metadata = check_data(cfg, tokenizer.vocab_size, tokenizer.mask_id)
    first = next(iter(metadata.values())).tokenizer
    if first.fingerprint != tokenizer.fingerprint:
        raise DataError(
            f"data.tokenizer {tokenizer.path} is not the tokenizer the data was written with ({first.path}); "
            f"point data.tokenizer at that folder or preprocess again"
        )

    def blend(prefixes: list[str], weights: list[float] | None) -> tuple[list[str], list[float] | None]:
        if len(prefixes) == 1:  # no BlendedDataset on top of a single GPTDataset
            return prefixes, None
        # Size-weighted by tokens, explicitly: megatron.core caps a size-weighted blend at one epoch.
        sizes = [float(metadata[p].tokens) for p in prefixes]
        return prefixes, list(weights) if weights is not None else sizes

    if cfg.valid_prefixes:
        splits = {
            "blend_per_split": [blend(cfg.prefixes, cfg.weights), blend(cfg.valid_prefixes, None), None]
        }
    else:
        splits = {"blend": blend(cfg.prefixes, cfg.weights), "split": cfg.split}
    # The config logs through megatron's rank-0 logger too (0.19 warns without a process group).
    with _process_group():
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=cfg.seq_length,
            path_to_cache=cfg.cache_dir or str(Path(cfg.prefixes[0]).parent / "cache"),
            tokenizer=_MegatronTokenizer(tokenizer),
            # PackedSequenceDataset restarts position ids with the document ids; the masks come
            # from tandem_kernels/.
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=cfg.eod_mask_loss,
            create_attention_mask=False,
            **splits,
        )
        built = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank, config).build()
    sources = [cfg.prefixes, cfg.valid_prefixes or cfg.prefixes, cfg.prefixes]
    return tuple(
        None
        if ds is None
        else PackedSequenceDataset(ds, tokenizer.eod_id, cfg.document_masks, tokenizer.vocab_size, prefixes)
        for ds, prefixes in zip(built, sources, strict=True)
    )


@dataclass(frozen=True)
class _MegatronTokenizer:
    """The few tokenizer attributes megatron.core's GPT datasets read."""

    info: TokenizerInfo

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def eod(self) -> int:
        return self.info.eod_id

    @property
    def pad(self) -> int:
        # -1 is megatron.core's "no pad token": ids that never occur in the data.
        return -1 if self.info.pad_id is None else self.info.pad_id

    @property
    def unique_identifiers(self) -> dict:
        # Part of the cache key: another tokenizer must not reuse these indices.
        return {"class": "tandem", "fingerprint": self.info.fingerprint}


@contextmanager
def _process_group():
    """megatron.core 0.16's BlendedDataset asks for the rank when it writes its cache: lend a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def document_ids_and_positions(tokens: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token [..., L]: the index of its document in the sample, and its position in that document.

    An EOD token belongs to the document it ends; the token after it starts the next one at position 0.
    """
    is_eod = tokens == eod_id
    document_ids = torch.cumsum(is_eod, dim=-1) - is_eod.long()
    index = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    starts = torch.zeros_like(is_eod)
    starts[..., 0] = True
    starts[..., 1:] = is_eod[..., :-1]
    first_index = torch.where(starts, index, 0).cummax(dim=-1).values
    return document_ids, index - first_index


class PackedSequenceDataset(torch.utils.data.Dataset):
    """megatron.core samples (documents packed back to back) with document-aware ids when asked."""

    def __init__(
        self,
        samples,
        eod_id: int,
        document_masks: bool,
        vocab_size: int | None = None,
        prefixes: list[str] | None = None,
    ):
        # The megatron.core BlendedDataset or GPTDataset behind it.
        self.samples = samples
        self.eod_id = eod_id
        self.document_masks = document_masks
        # Token ids at or past vocab_size mean a damaged .bin (the size checks cannot see same-size
        # garbage); refused here, by name, instead of as an index error inside the embedding.
        self.vocab_size = vocab_size
        self.prefixes = prefixes or []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = self.samples[idx]
        if self.vocab_size is not None:
            tokens = sample["tokens"]
            low, high = int(tokens.min()), int(max(tokens.max(), sample["labels"].max()))
            if low < 0 or high >= self.vocab_size:
                source = int(sample.get("dataset_id", 0))
                prefix = self.prefixes[source] if source < len(self.prefixes) else "the data"
                raise DataError(
                    f"sample {idx} of {prefix} holds token id {high if high >= self.vocab_size else low}, "
                    f"outside the vocabulary [0, {self.vocab_size}): its .bin is damaged (garbage of the "
                    f"right size); re-run preprocessing for it with --overwrite"
                )
        item = {
            "tokens": sample["tokens"],  # [L]
            "labels": sample["labels"],  # [L], the next token
            "loss_mask": sample["loss_mask"],  # [L]
            "position_ids": sample["position_ids"],  # [L]
            # Which blend prefix the sample came from (0 when there is one).
            "dataset_id": torch.tensor(int(sample.get("dataset_id", 0))),
        }
        if self.document_masks:
            item["document_ids"], item["position_ids"] = document_ids_and_positions(
                sample["tokens"], self.eod_id
            )
        return item


@dataclass
class Batch:
    """One micro-batch, as the training step reads it."""

    tokens: torch.Tensor  # [b, L] long
    labels: torch.Tensor  # [b, L] long, tokens shifted by one
    loss_mask: torch.Tensor  # [b, L] float
    position_ids: torch.Tensor  # [b, L] long, restarting at each document with document_masks
    dataset_ids: torch.Tensor  # [b] long, the blend prefix of each sample
    document_ids: torch.Tensor | None = None  # [b, L] long with document_masks, else None


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """One batch of PackedSequenceDataset samples (the training step moves it to the model's device
    with the objective's inputs, ``train.objectives.ModelInputs.to``)."""

    def stack(key: str) -> torch.Tensor:
        return torch.stack([s[key] for s in samples])

    return Batch(
        tokens=stack("tokens"),
        labels=stack("labels"),
        loss_mask=stack("loss_mask"),
        position_ids=stack("position_ids"),
        dataset_ids=stack("dataset_id"),
        document_ids=stack("document_ids") if "document_ids" in samples[0] else None,
    )
