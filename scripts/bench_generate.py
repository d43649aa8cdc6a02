"""Decoding benchmark for an exported model: TPF and speed of each mode against AR, measured in one run.

    python scripts/bench_generate.py --model exports/quickstart [--prompts 12] [--max-new-tokens 64]

On a fixed prompt set (held-out demo text when available), batch 1, greedy:
- AR, block diffusion at the default threshold, and self-speculation in two passes per iteration
  (self_spec) and in one (self_spec_fused): TPF (tokens per forward pass, every pass counted:
  prefill, denoise, append, draft, verify), tokens/s and the speed ratio to AR;
  for self-speculation also tokens per verify pass and the mean accepted draft length, and whether its
  output equals AR token for token;
- sweeps of the diffusion threshold and of the block length;
- a PNG of TPF and speed-up per setting beside the model folder (or --plot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from model.generation import decode, encode_prompt, load_export

FALLBACK_PROMPTS = [
    "The river",
    "In 1905, the",
    "The city of",
    "Photosynthesis is",
    "The king said",
    "A large number of",
    "The history of",
    "Mathematics is the",
    "During the war",
    "The population of",
    "Music is",
    "The first",
]


def demo_prompts(count: int) -> list[str]:
    """Openings of held-out Wikipedia documents from the demo corpus, or a fixed list."""
    try:
        from data.corpora import WIKI, split_corpus

        valid = split_corpus(WIKI)["valid"]
        return [" ".join(text.split()[:8]) for text in valid[:count]]
    except Exception:
        return FALLBACK_PROMPTS[:count]


def run_mode(model, tokenizer, prompts, mode, max_new, **options) -> dict:
    results = [
        decode(model, tokenizer, encode_prompt(tokenizer, p), mode, max_new, **options) for p in prompts
    ]
    tokens = sum(len(r.ids) for r in results)
    nfe = sum(r.nfe for r in results)
    seconds = sum(r.seconds for r in results)
    row = {
        "tokens": tokens,
        "nfe": nfe,
        "tpf": tokens / nfe,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "outputs": [r.ids for r in results],
    }
    verify = sum(r.passes.get("verify", 0) for r in results)
    if verify:
        accepted = [a for r in results for a in r.accepted]
        row["tokens_per_verify"] = tokens / verify
        row["mean_accepted"] = statistics.mean(accepted)
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--thresholds", default="0.9,0.7,0.5,0.3,0.1")
    parser.add_argument("--block-lengths", default="")
    parser.add_argument("--plot", help="PNG path (default: <model>/bench_generate.png)")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load_export(args.model)
    block = model.config.block_size
    prompts = demo_prompts(args.prompts)
    n = args.max_new_tokens
    ar = run_mode(model, tokenizer, prompts, "ar", n)
    rows = {"ar": ar}
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    blocks = [int(b) for b in args.block_lengths.split(",") if b] or sorted(
        {max(2, block // 4), max(2, block // 2), block}
    )
    for t in thresholds:
        rows[f"diffusion t={t} B={block}"] = run_mode(
            model, tokenizer, prompts, "diffusion", n, block_length=block, threshold=t
        )
    for b in blocks:
        rows[f"self_spec B={b}"] = run_mode(model, tokenizer, prompts, "self_spec", n, block_length=b)
        rows[f"self_spec_fused B={b}"] = run_mode(
            model, tokenizer, prompts, "self_spec_fused", n, block_length=b
        )
        if b != block:
            rows[f"diffusion t=0.9 B={b}"] = run_mode(
                model, tokenizer, prompts, "diffusion", n, block_length=b, threshold=0.9
            )
    print(
        f"{len(prompts)} prompts x {n} new tokens, batch 1, greedy, {torch.get_num_threads()} threads; "
        f"trained block size {block}"
    )
    print(
        f"{'setting':26s} {'TPF':>6s} {'tok/s':>8s} {'speed vs AR':>11s} {'tok/verify':>10s} "
        f"{'accepted':>8s} {'=AR':>5s}"
    )
    for name, row in rows.items():
        same = sum(
            a == b
            for o, r in zip(row["outputs"], ar["outputs"], strict=True)
            for a, b in zip(o, r, strict=False)
        )
        agree = same / max(ar["tokens"], 1)
        extra = (
            f"{row['tokens_per_verify']:10.2f} {row['mean_accepted']:8.2f}"
            if "tokens_per_verify" in row
            else f"{'':10s} {'':8s}"
        )
        print(
            f"{name:26s} {row['tpf']:6.3f} {row['tokens_per_s']:8.1f} "
            f"{row['tokens_per_s'] / ar['tokens_per_s']:10.2f}x"
            f" {extra} {agree:5.2f}"
        )
    diffusion = {k: v for k, v in rows.items() if k.startswith("diffusion") and f"B={block}" in k}
    best = max(diffusion, key=lambda k: diffusion[k]["tpf"])
    print(f"best diffusion setting by TPF: {best} (TPF {diffusion[best]['tpf']:.3f})")
    plot = Path(args.plot) if args.plot else Path(args.model) / "bench_generate.png"
    _plot(rows, ar, plot)
    print(f"plot: {plot}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: {m: v for m, v in r.items() if m != "outputs"} for k, r in rows.items()}, indent=2)
        )
    return 0


def _plot(rows: dict, ar: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    axes[0].barh(names, [rows[k]["tpf"] for k in names], color="tab:blue")
    axes[0].set_xlabel("tokens per forward pass (all passes)")
    axes[0].axvline(1.0, color="grey", lw=0.8)
    axes[1].barh(names, [rows[k]["tokens_per_s"] / ar["tokens_per_s"] for k in names], color="tab:orange")
    axes[1].set_xlabel("speed vs AR (tokens/s ratio)")
    axes[1].axvline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
