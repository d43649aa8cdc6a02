"""Write the demo data: a BPE tokenizer and train/valid datasets of the bundled corpora (data/corpora.py).

    python scripts/prepare_demo_data.py --out .cache/tandem/demo --vocab-size 4096

Idempotent: a second run reuses the finished tokenizer and datasets. configs/data/demo.yaml reads the
same folder ($TANDEM_DATA, default .cache/tandem/demo).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from data.corpora import default_demo_dir, prepare_demo
from data.metadata import DatasetMetadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=None, help=f"output folder (default: $TANDEM_DATA or {default_demo_dir()})"
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: up to 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    start = time.perf_counter()
    try:
        demo = prepare_demo(args.out, args.vocab_size, args.workers, progress=not args.quiet)
    except (ValueError, OSError) as err:
        print(f"prepare_demo_data: error: {err}", file=sys.stderr)
        return 1
    print(f"demo data in {demo.root} ({time.perf_counter() - start:.1f} s); tokenizer: {demo.tokenizer}")
    for part, prefixes in (("train", demo.train), ("valid", demo.valid)):
        for prefix in prefixes.values():
            print(describe(part, prefix))
    return 0


def describe(part: str, prefix) -> str:
    """One summary line of the written dataset at ``prefix``."""
    meta = DatasetMetadata.read(prefix)
    return (
        f"  {part:5s} {prefix}: {meta.documents:>6,} documents {meta.tokens:>10,} tokens "
        f"{meta.chars_per_token:.2f} chars/token"
    )


if __name__ == "__main__":
    sys.exit(main())
