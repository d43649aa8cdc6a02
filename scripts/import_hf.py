"""Import a Hugging Face model into a Tandem checkpoint the trainer starts from (weights only).

    python scripts/import_hf.py --hf path/to/Ministral-3-8B-Base --out ckpt/ministral3-8b [--tp 4 --pp 1]
    python -m train experiment=... checkpoint.load=ckpt/ministral3-8b checkpoint.finetune=true

Sources: Nemotron-Labs-Diffusion exports and Llama / Mistral / Ministral-3 / Qwen3 causal LMs (AR ->
joint conversion). A tied head becomes an untied head initialised from the embedding; the mask token
is the source's own, or --mask-id, or a new <|mask|> token. The checkpoint reshards on load, so it
serves any TP/PP; --tp/--pp check that the layout divides the model.
"""

from __future__ import annotations

import argparse
import sys

from model.config import ConfigError
from train.convert import import_hf


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="the Tandem checkpoint folder to write")
    parser.add_argument(
        "--tp", type=int, default=1, help="parallel.tensor of the runs that will load it (checked)"
    )
    parser.add_argument(
        "--pp", type=int, default=1, help="parallel.pipeline of the runs that will load it (checked)"
    )
    parser.add_argument("--mask-id", type=int, help="an existing token id to use as [MASK]")
    parser.add_argument("--block-size", type=int, help="diffusion block size to record (default 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = import_hf(
            args.hf,
            args.out,
            tp=args.tp,
            pp=args.pp,
            mask_token_id=args.mask_id,
            block_size=args.block_size,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{kind}: {err}", file=sys.stderr)
        return 2
    print(f"imported {args.hf} -> {out}\ntrain from it with: checkpoint.load={out} checkpoint.finetune=true")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
