"""`python -m train [overrides]` (or `tandem-train`): compose configs/train.yaml, validate, train.

Under torchrun every rank runs this; Hydra writes nothing of its own (no per-rank output folders):
the run folder is `run_dir`, where the trainer saves the resolved config, logs and checkpoints.

A start or run that fails for a reason the user can fix (config, data, checkpoint, disk, another
trainer on the folder, divergence) ends with one line naming the error, not a traceback, and exits
non-zero at once: the process groups are torn down first, and an exit that something still holds up
(a non-daemon thread, an exit handler) is forced after a few seconds, so that a launcher sees the
failure and stops the other ranks instead of leaving them in a collective until the timeout.
"""

from __future__ import annotations

import os
import sys
import threading

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from model.config import ConfigError
from train.config import CONFIG_DIR, load_config, register_configs

# Seconds an exit after a failure may take before it is forced.
EXIT_GRACE_S = 10.0


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        train_cfg = load_config(cfg)
    except ConfigError as err:
        print(f"Config error: {err}", file=sys.stderr)
        sys.exit(2)
    from train.checkpoint import CheckpointError
    from train.loop import run

    try:
        result = run(train_cfg)
    except ConfigError as err:
        _fail(f"Config error: {err}", 2)
    except KeyboardInterrupt:
        # Ctrl-C during start-up, or a second one: no save; whatever was saved is intact.
        _fail("KeyboardInterrupt: stopped without saving; the last checkpoint is intact", 130)
    except (CheckpointError, ValueError, OSError, FloatingPointError) as err:
        _fail(f"{type(err).__name__}: {err}", 1)
    except RuntimeError as err:
        if not _peer_failed(err):
            raise
        _fail(f"{type(err).__name__}: a collective failed, another rank stopped: {_first_line(err)}", 1)
    print(f"run folder: {result.run_dir}\ncheckpoints: {result.checkpoint_dir} (step {result.step})")


def _peer_failed(err: RuntimeError) -> bool:
    """A collective that failed because a peer process went away (gloo reports a closed connection)."""
    return isinstance(err, dist.DistError) or any(
        hint in str(err) for hint in ("Connection closed by peer", "Connection reset by peer")
    )


def _first_line(err: BaseException) -> str:
    return next(iter(str(err).splitlines()), "")[:300]


def _fail(message: str, code: int) -> None:
    """Print ``message`` (rank 0 in full, other ranks its first line) and exit with ``code``."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        message = f"rank {rank}: " + (message if rank == 0 else message.splitlines()[0])
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    watchdog = threading.Timer(EXIT_GRACE_S, os._exit, args=(code,))
    watchdog.daemon = True
    watchdog.start()
    sys.exit(code)


def main() -> None:
    register_configs()
    _main()


if __name__ == "__main__":
    main()
