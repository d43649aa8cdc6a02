"""Tokenize documents into a Megatron indexed dataset: ``<prefix>.bin/.idx`` plus ``<prefix>.json``.

Documents are cut into shards of ``shard_docs``. Worker processes tokenize shards into a work folder
(temp names, renamed when complete, then a small ``.json`` marks the shard done), so a re-run after a
crash redoes only unfinished shards. The shards are concatenated in order under temp names, renamed into
place, and the metadata is written last: the result is byte-identical however often the run was cut.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.metadata import FORMAT_VERSION, DatasetMetadata, metadata_path, write_atomic
from data.sources import DocumentSource
from data.tokenizer import TokenizerInfo, load_tokenizer


@dataclass(frozen=True)
class ShardStats:
    rows: int  # input rows read
    documents: int  # documents written: rows with non-empty text
    tokens: int  # EOD included
    characters: int
    skipped_documents: int  # rows with empty or missing text


@dataclass(frozen=True)
class PreprocessResult:
    metadata: DatasetMetadata
    shards: int
    # Shards finished by an earlier, interrupted run and not redone.
    shards_reused: int
    seconds: float
    # The output already existed for this input and tokenizer: nothing was done.
    up_to_date: bool


def token_dtype(vocab_size: int) -> type[np.integer]:
    """megatron.core's choice: uint16 while every id fits, else int32."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def preprocess(
    source: DocumentSource,
    output_prefix: str | Path,
    tokenizer: TokenizerInfo,
    *,
    workers: int = 1,
    shard_docs: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize ``source`` into ``output_prefix`` (EOD after each document); resume or skip when possible."""
    if workers < 1 or shard_docs < 1:
        raise ValueError(f"workers={workers} and shard_docs={shard_docs} must both be >= 1")
    start = time.perf_counter()
    prefix = Path(output_prefix)
    description = source.describe()
    fingerprint = _fingerprint(description, tokenizer)
    existing = _read_existing(prefix)
    if existing is not None and existing.fingerprint == fingerprint:
        return PreprocessResult(existing, 0, 0, time.perf_counter() - start, up_to_date=True)
    work = prefix.with_name(f"{prefix.name}.work-{fingerprint[:16]}-{shard_docs}")
    outputs = [p for p in (metadata_path(prefix), Path(f"{prefix}.bin"), Path(f"{prefix}.idx")) if p.exists()]
    # Without this run's work folder, files at the prefix are someone else's: replace them only when asked.
    if outputs and not overwrite and not work.exists():
        raise FileExistsError(
            f"{prefix} already has {', '.join(map(str, outputs))}, not written from this input with this "
            f"tokenizer; pass --overwrite (overwrite=True) to replace them or choose another output prefix"
        )
    work.mkdir(parents=True, exist_ok=True)
    dataset = source.load(work / "hf_cache")  # before deleting anything: bad input leaves old outputs be
    if len(dataset) == 0:
        raise ValueError(f"{source} holds no documents; check the input")
    for path in outputs:  # the .json first: the .bin/.idx beside it must never look finished
        path.unlink()

    backend = load_tokenizer(tokenizer.path).backend_tokenizer
    # Text that spells a special token ("<|endoftext|>") stays text: EOD and mask ids come only from us.
    backend.encode_special_tokens = True
    job = _ShardJob(dataset, backend, tokenizer.eod_id, token_dtype(tokenizer.vocab_size), work, shard_docs)
    done = {i: stats for i in range(job.shards) if (stats := job.finished(i)) is not None}
    reused = len(done)
    _run_shards(job, done, workers, progress, prefix.name)
    total = ShardStats(
        *(sum(getattr(s, f.name) for s in done.values()) for f in dataclasses.fields(ShardStats))
    )
    if total.documents == 0:
        raise ValueError(
            f"all {len(dataset)} documents of {source} are empty; check --text-key and the input"
        )
    _merge_shards(job, prefix)
    metadata = DatasetMetadata(
        fingerprint=fingerprint,
        tokenizer=tokenizer,
        documents=total.documents,
        tokens=total.tokens,
        characters=total.characters,
        skipped_documents=total.skipped_documents,
        dtype=np.dtype(job.dtype).name,
        source=description,
    )
    metadata.write(prefix)
    shutil.rmtree(work)
    return PreprocessResult(metadata, job.shards, reused, time.perf_counter() - start, up_to_date=False)


def _fingerprint(description: dict, tokenizer: TokenizerInfo) -> str:
    # The tokenizer's path is left out: a moved or copied tokenizer folder gives the same bytes.
    tokenizer_fields = {k: v for k, v in dataclasses.asdict(tokenizer).items() if k != "path"}
    key = {"format_version": FORMAT_VERSION, "source": description, "tokenizer": tokenizer_fields}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_existing(prefix: Path) -> DatasetMetadata | None:
    try:
        return DatasetMetadata.read(prefix)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None  # unfinished, foreign or from an older format: not up to date


@dataclass(frozen=True)
class _ShardJob:
    """Shard ``i`` holds documents [i * shard_docs, (i + 1) * shard_docs) as ``work/<i>.bin/.idx``."""

    dataset: object  # datasets.Dataset with a "text" column
    # A tokenizers.Tokenizer: fast to fork and free of transformers' per-call overhead.
    backend: object
    eod_id: int
    dtype: type[np.integer]
    work: Path
    shard_docs: int

    @property
    def shards(self) -> int:
        return math.ceil(len(self.dataset) / self.shard_docs)

    def path(self, index: int) -> Path:
        return self.work / f"{index:06d}"

    def finished(self, index: int) -> ShardStats | None:
        marker = self.path(index).with_suffix(".json")
        return ShardStats(**json.loads(marker.read_text())) if marker.exists() else None

    def run(self, index: int) -> tuple[int, ShardStats]:
        """Tokenize shard ``index`` into temp files, rename them, then write its marker."""
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        lo = index * self.shard_docs
        texts = self.dataset[lo : lo + self.shard_docs]["text"]
        kept = []
        for row, text in enumerate(texts, start=lo):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"document {row}: the text value is a {type(text).__name__}, not a string")
            if text and not text.isspace():
                kept.append(text)
        target = self.path(index)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=self.dtype)
        tokens = 0
        for encoding in self.backend.encode_batch_fast(kept, add_special_tokens=False):
            ids = np.empty(len(encoding.ids) + 1, dtype=self.dtype)
            ids[:-1] = encoding.ids
            ids[-1] = self.eod_id
            builder.add_document(ids, [ids.size])
            tokens += ids.size
        builder.finalize(f"{tmp}.idx")
        for suffix in (".bin", ".idx"):
            _fsync(f"{tmp}{suffix}")
            os.replace(f"{tmp}{suffix}", f"{target}{suffix}")
        stats = ShardStats(len(texts), len(kept), tokens, sum(map(len, kept)), len(texts) - len(kept))
        write_atomic(target.with_suffix(".json"), json.dumps(dataclasses.asdict(stats)))
        return index, stats


def _run_shards(job: _ShardJob, done: dict[int, ShardStats], workers: int, progress: bool, name: str) -> None:
    """Run the shards not in ``done`` on ``workers`` processes, adding their stats to ``done``."""
    # Imported before the fork, so that workers inherit it, and only here, so that an output that is
    # already finished never pays for importing megatron.core.
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    from tqdm import tqdm

    pending = [i for i in range(job.shards) if i not in done]
    initial = sum(s.rows for s in done.values())
    bar = tqdm(
        total=len(job.dataset),
        initial=initial,
        unit="doc",
        desc=name,
        disable=not progress,
        dynamic_ncols=True,
    )
    tokens, start = 0, time.perf_counter()
    if pending:
        # One thread per worker (no nested parallelism), so `workers` is the number of cores used.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            context = multiprocessing.get_context("fork")
            with context.Pool(min(workers, len(pending)), initializer=_set_job, initargs=(job,)) as pool:
                for index, stats in pool.imap_unordered(_run_shard, pending):
                    done[index] = stats
                    tokens += stats.tokens
                    bar.update(stats.rows)
                    rate = tokens / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tok/s")
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    bar.close()


_JOB: _ShardJob | None = None  # the job of this worker process


def _set_job(job: _ShardJob) -> None:
    global _JOB
    _JOB = job


def _run_shard(index: int) -> tuple[int, ShardStats]:
    return _JOB.run(index)


def _merge_shards(job: _ShardJob, prefix: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=job.dtype)
    # add_index runs gc.collect() per shard (0.2 s with torch loaded); frozen objects make that free.
    gc.freeze()
    try:
        with warnings.catch_warnings():
            # megatron.core 0.19 warns it defaults to rank 0 without torch.distributed; right for this job.
            warnings.filterwarnings("ignore", message="Could not determine rank")
            for index in range(job.shards):
                builder.add_index(str(job.path(index)))
    finally:
        gc.unfreeze()
    builder.finalize(f"{tmp}.idx")
    for suffix in (".bin", ".idx"):  # .bin first: a lone .bin is never mistaken for a dataset
        _fsync(f"{tmp}{suffix}")
        os.replace(f"{tmp}{suffix}", f"{prefix}{suffix}")


def _fsync(path: str) -> None:
    # Data must be on disk before the rename that declares it complete (power loss, not just a crash).
    with open(path, "rb") as f:
        os.fsync(f.fileno())
