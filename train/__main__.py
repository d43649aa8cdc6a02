"""`python -m train [overrides]` (or `tandem-train`): compose configs/train.yaml, validate, train.

Under torchrun every rank runs this; Hydra writes nothing of its own (no per-rank output folders):
the run folder is `run_dir`, where the trainer saves the resolved config, logs and checkpoints.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from model.config import ConfigError
from train.config import CONFIG_DIR, load_config, register_configs


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        train_cfg = load_config(cfg)
    except ConfigError as err:
        print(f"Config error: {err}", file=sys.stderr)
        sys.exit(2)
    from train.loop import run

    result = run(train_cfg)
    print(f"run folder: {result.run_dir}\ncheckpoints: {result.checkpoint_dir} (step {result.step})")


def main() -> None:
    register_configs()
    _main()


if __name__ == "__main__":
    main()
