"""Export a Tandem checkpoint (saved at any TP/PP) to a Hugging Face folder in the NLD format.

    python scripts/export_hf.py --checkpoint runs/quickstart --out exports/quickstart [--dtype bfloat16]

--checkpoint takes a run folder, its checkpoints/ folder, or one iter_* folder (the newest complete
checkpoint is used). The folder loads with
``AutoModel.from_pretrained(out, trust_remote_code=True)`` and offers ar_generate, generate and
linear_spec_generate.
"""

from __future__ import annotations

import argparse
import sys

from model.hf.config_json import HF_DTYPES
from train.checkpoint import CheckpointError
from train.convert import export_checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoints/ folder or iter_* folder"
    )
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=sorted(HF_DTYPES), help="weights dtype (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
