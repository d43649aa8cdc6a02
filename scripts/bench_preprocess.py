"""Preprocessing throughput on the bundled corpora: Tandem with 1 and 2 workers vs a plain loop.

    python scripts/bench_preprocess.py [--tokenizer DIR] [--repeats 3]     # about 90 s on 2 cores

The baseline is the simplest correct program: one process, ``tokenizer.encode`` per document, EOD
appended, numpy ``tofile``. All runs write the same tokens (checked); each row is a median over repeats,
measured side by side in one process, so the ratios hold on a noisy machine better than the rates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from data.corpora import CORPORA, split_corpus
from data.preprocess import preprocess, token_dtype
from data.sources import Texts
from data.tokenizer import load_tokenizer, load_tokenizer_info, train_tokenizer


def baseline(corpora: dict, tokenizer_dir: Path, out: Path) -> tuple[float, int]:
    """Seconds and tokens for the plain loop; writes ``out/<name>.bin``."""
    tokenizer = load_tokenizer(tokenizer_dir)
    eod, dtype = tokenizer.eos_token_id, token_dtype(len(tokenizer))
    start, tokens = time.perf_counter(), 0
    for name, (texts, _) in corpora.items():
        with open(out / f"{name}.bin", "wb") as f:
            for text in texts:
                ids = np.array([*tokenizer.encode(text, add_special_tokens=False), eod], dtype=dtype)
                ids.tofile(f)
                tokens += ids.size
    return time.perf_counter() - start, tokens


def tandem(corpora: dict, tokenizer_dir: Path, out: Path, workers: int) -> tuple[float, int]:
    """Seconds and tokens for data.preprocess with ``workers`` processes; writes ``out/<name>.bin``."""
    info = load_tokenizer_info(tokenizer_dir)
    start, tokens = time.perf_counter(), 0
    for name, (texts, shard_docs) in corpora.items():
        result = preprocess(
            Texts(name, texts),
            out / name,
            info,
            workers=workers,
            shard_docs=shard_docs,
            overwrite=True,
            progress=False,
        )
        tokens += result.metadata.tokens
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a 4096 BPE)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # One thread per tokenizing process everywhere, so that "1 worker" means one core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    corpora = {c.name: (split_corpus(c)["train"], c.shard_docs) for c in CORPORA}
    chars = sum(len(t) for texts, _ in corpora.values() for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tokenizer"
        if not args.tokenizer:
            train_tokenizer((t for texts, _ in corpora.values() for t in texts), tokenizer_dir, 4096)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401  (import not timed)

        runs = {"plain loop": lambda out: baseline(corpora, tokenizer_dir, out)}
        for workers in (1, 2):
            runs[f"tandem, {workers} worker{'s' * (workers > 1)}"] = lambda out, w=workers: tandem(
                corpora, tokenizer_dir, out, w
            )
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        outputs: dict[str, Path] = {}
        for repeat in range(args.repeats):
            for name, run in runs.items():  # interleaved: drift on the machine hits every row alike
                out = tmp / f"{name.replace(' ', '_').replace(',', '')}_{repeat}"
                out.mkdir()
                elapsed, tokens = run(out)
                seconds[name].append(elapsed)
                outputs[name] = out
        reference = outputs["plain loop"]
        for name, out in outputs.items():
            for corpus in corpora:
                if (out / f"{corpus}.bin").read_bytes() != (reference / f"{corpus}.bin").read_bytes():
                    raise SystemExit(f"{name} wrote other tokens than the plain loop for {corpus}")

    base = statistics.median(seconds["plain loop"])
    print(f"bundled corpora (train parts): {chars:,} characters, {tokens:,} tokens, {os.cpu_count()} CPUs")
    print(f"{'method':<20}{'seconds':>10}{'tokens/s':>14}{'vs plain':>10}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<20}{median:>10.2f}{tokens / median:>14,.0f}{base / median:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
