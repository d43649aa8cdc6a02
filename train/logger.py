"""Where metrics go: a progress bar, metrics.jsonl, TensorBoard, Weights & Biases, and a loss-curve PNG.

Only the main rank writes. Weights & Biases runs offline unless WANDB_API_KEY is set, so a run never
needs the network; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from train.config import LoggingConfig

log = logging.getLogger("tandem")


class MetricsLogger:
    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        config_dict: dict | None = None,
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.bar = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                dir=str(run_dir),
                mode=mode,
                config=config_dict,
                name=run_dir.name,
                resume="allow",
                id=_wandb_id(run_dir),
            )

    def train(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write("train", step, metrics)
        self.bar.n = step
        shown = {
            k: metrics[k] for k in ("loss", "ar_loss", "diffusion_loss", "lr", "tokens_per_s") if k in metrics
        }
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.refresh()

    def advance(self, step: int) -> None:
        if self.enabled:
            self.bar.n = step
            self.bar.refresh()

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write("valid", step, metrics)
        text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        tqdm.write(f"step {step} validation: {text}")
        plot_losses(self.jsonl, self.run_dir / "loss_curve.png")

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def _write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"{split}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl.exists():
            plot_losses(self.jsonl, self.run_dir / "loss_curve.png")


def _wandb_id(run_dir: Path) -> str:
    # One W&B run per run folder, so a resumed run continues its curves.
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def read_metrics(jsonl: Path) -> list[dict]:
    if not jsonl.exists():
        return []
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def plot_losses(jsonl: Path, png: Path) -> None:
    """Training and validation losses per step, one panel per loss part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)
    keys = [k for k in ("loss", "ar_loss", "diffusion_loss", "masked_ce") if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for split, style in (("train", "-"), ("valid", "o-")):
            points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(
                    steps, values, style, label=split, markersize=3, alpha=0.6 if split == "train" else 1.0
                )
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
