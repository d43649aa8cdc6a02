"""`python -m train [--cfg] [overrides]` (or `tandem-train`): compose configs/train.yaml, validate, train.

The arguments are Hydra overrides (``experiment=quickstart steps=200 optim.lr=1e-3``,
``'data.prefixes=[/data/a,/data/b]'``, ``+key=value``), composed with Hydra's compose API and
validated once (``train.config.compose_config``); ``--cfg`` prints the validated config and exits.
Under torchrun every rank runs this; nothing is written outside `run_dir`, where the trainer saves
the resolved config, logs and checkpoints.

A start or run that fails for a reason the user can fix (config, data, checkpoint, disk, another
trainer on the folder, divergence) ends with one line naming the error, not a traceback, and exits
non-zero at once: the process groups are torn down first, and an exit that something still holds up
(a non-daemon thread, an exit handler) is forced after a few seconds, so that a launcher sees the
failure and stops the other ranks instead of leaving them in a collective until the timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import torch.distributed as dist

from model.config import ConfigError
from train.config import CONFIG_DIR, compose_config, to_yaml

# Seconds an exit after a failure may take before it is forced.
EXIT_GRACE_S = 10.0


def _parser() -> argparse.ArgumentParser:
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    options = "\n".join(
        f"  {group:<11} " + ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
        for group in groups
    )
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a Tandem model as configs/train.yaml and the overrides say.",
        epilog=f"config groups ({CONFIG_DIR}), chosen with group=option:\n{options}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cfg", action="store_true", help="print the composed, validated config and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=quickstart steps=200")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train_cfg = compose_config(args.overrides)
    except ConfigError as err:
        print(f"Config error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.cfg:
        print(to_yaml(train_cfg), end="")
        return
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


if __name__ == "__main__":
    main()
