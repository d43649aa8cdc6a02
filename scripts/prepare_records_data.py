"""Write the records demo data: generated stock ledgers (data/records.py), their BPE tokenizer, and
train/valid indexed datasets.

    python scripts/prepare_records_data.py --out .cache/tandem/records [--seed 0] [--vocab-size 1024]

Idempotent: a second run with the same arguments reuses the finished tokenizer and datasets.
configs/data/records.yaml reads the same folder ($TANDEM_RECORDS, default .cache/tandem/records);
a --vocab-size other than the default needs model.vocab_size to match when training.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from data.records import (
    DEFAULT_SEED,
    TRAIN_DOCUMENTS,
    VALID_DOCUMENTS,
    VOCAB_SIZE,
    default_records_dir,
    prepare_records,
)
from scripts.prepare_demo_data import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=None, help=f"output folder (default: $TANDEM_RECORDS or {default_records_dir()})"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train-documents", type=int, default=TRAIN_DOCUMENTS)
    parser.add_argument("--valid-documents", type=int, default=VALID_DOCUMENTS)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: up to 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    start = time.perf_counter()
    try:
        data = prepare_records(
            args.out,
            seed=args.seed,
            train_documents=args.train_documents,
            valid_documents=args.valid_documents,
            vocab_size=args.vocab_size,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (ValueError, OSError) as err:
        print(f"prepare_records_data: error: {err}", file=sys.stderr)
        return 1
    print(f"records data in {data.root} ({time.perf_counter() - start:.1f} s); tokenizer: {data.tokenizer}")
    for part, prefix in (("train", data.train), ("valid", data.valid)):
        print(describe(part, prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
