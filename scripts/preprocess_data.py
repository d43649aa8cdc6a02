"""Tokenize text into a Megatron indexed dataset: PREFIX.bin/.idx and PREFIX.json (logic: data/preprocess.py).

    python scripts/preprocess_data.py --input corpus/ extra.jsonl --output-prefix data/web \\
        --tokenizer .cache/tandem/demo/tokenizer --text-key text --workers 8

Re-running the same command skips a finished output and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from data.preprocess import preprocess
from data.sources import HubDataset, LocalFiles
from data.tokenizer import load_tokenizer_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--input", nargs="+", metavar="PATH", help="jsonl/json/parquet/txt files (.gz too) or folders of them"
    )
    inputs.add_argument("--dataset", metavar="NAME", help="a datasets.load_dataset name (needs the hub)")
    parser.add_argument("--dataset-config", default=None, help="the config name of --dataset")
    parser.add_argument("--split", default="train", help="the split of --dataset")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="a folder AutoTokenizer loads")
    parser.add_argument(
        "--mask-id", type=int, default=None, help="a reserved id, if the tokenizer has no mask token"
    )
    parser.add_argument("--text-key", default="text", help="the field holding the text (not for .txt files)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--shard-docs", type=int, default=1000, help="documents per resumable shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an output made from other input")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        tokenizer = load_tokenizer_info(args.tokenizer, mask_id=args.mask_id)
        if args.input:
            source = LocalFiles(args.input, args.text_key)
        else:
            source = HubDataset(args.dataset, args.split, args.dataset_config, args.text_key)
        result = preprocess(
            source,
            args.output_prefix,
            tokenizer,
            workers=args.workers,
            shard_docs=args.shard_docs,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, OSError) as err:  # users' mistakes: the message names the file and the fix
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    meta = result.metadata
    if result.up_to_date:
        print(f"{args.output_prefix} is up to date ({meta.documents:,} documents, {meta.tokens:,} tokens)")
        return 0
    resumed = f"; {result.shards_reused} of {result.shards} shards reused" if result.shards_reused else ""
    print(
        f"wrote {args.output_prefix}.bin/.idx/.json: {meta.documents:,} documents "
        f"({meta.skipped_documents:,} empty skipped), {meta.tokens:,} tokens, "
        f"{meta.chars_per_token:.2f} chars/token, {result.seconds:.1f} s{resumed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
