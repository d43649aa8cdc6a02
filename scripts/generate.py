"""Decode a prompt with an exported model: ar, diffusion, self_spec or self_spec_fused.

    python scripts/generate.py --model exports/quickstart --mode self_spec --prompt "The river" \
        --max-new-tokens 64 [--block-length 16] [--threshold 0.9] [--temperature 0] [--json] \
        [--device cuda] [--dtype bfloat16]

Prints the text, or with --json one object with text, ids, nfe, tpf (tokens per forward pass, every
pass counted) and seconds. The model, the prompt and the sampling generator all live on --device
(default: the GPU when there is one). An option the mode does not take is refused (the modes and
their options: ``model.hf.MODES``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from model.hf import MODES, Generation, decode, encode_prompt, load_export
from model.hf.config_json import HF_DTYPES

# The decoding options of the command line; a mode refuses those it does not take (MODES[mode].options).
DECODING_OPTIONS = ("block_length", "threshold", "steps")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a folder written by scripts/export_hf.py")
    parser.add_argument("--mode", required=True, choices=sorted(MODES))
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--block-length",
        type=int,
        help="diffusion / self_spec / self_spec_fused block (default: the model's)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="diffusion: commit confidence (default 0.9); "
        "self_spec: draft confidence (default 0: one draft pass)",
    )
    parser.add_argument("--steps", type=int, help="diffusion without threshold: passes per block")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(HF_DTYPES))
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    for option in decoding_options(args):
        if option not in mode.options:
            takes = ", ".join(_flag(o) for o in DECODING_OPTIONS if o in mode.options) or "none of them"
            parser.error(f"{_flag(option)} does not apply to {mode.name} (it takes {takes})")
    return args


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def decoding_options(args: argparse.Namespace) -> dict:
    """The decoding options given on the command line (the mode's defaults for the others)."""
    return {option: getattr(args, option) for option in DECODING_OPTIONS if getattr(args, option) is not None}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_export(args.model, dtype=HF_DTYPES[args.dtype], device=args.device)
        result = generate(model, tokenizer, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in result.as_json().items() if k in ("text", "ids", "nfe", "tpf", "seconds")}
            )
        )
    else:
        print(result.text)
    return 0


def generate(model, tokenizer, args: argparse.Namespace) -> Generation:
    """Decode ``args.prompt`` as the command line asks, on the model's device."""
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    prompt = encode_prompt(tokenizer, args.prompt)
    return decode(
        model,
        tokenizer,
        prompt,
        args.mode,
        args.max_new_tokens,
        temperature=args.temperature,
        generator=generator,
        **decoding_options(args),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
