"""Opening an export folder: the one way the command line, the benchmark, the evaluation harness, the
quickstart, the GPU check and the golden record load a Tandem (NLD-format) export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.hf.config_json import ARCHITECTURE, MODEL_TYPE


def load_export(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a Tandem/NLD export folder on ``device``, offline, with the folder's own
    remote code; a clear error for anything else."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but this machine has no CUDA; use --device cpu")
    hf_logging.disable_progress_bar()
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a folder written by scripts/export_hf.py")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != MODEL_TYPE or ARCHITECTURE not in config.get("architectures", []):
        raise ValueError(
            f"{folder} is not a Nemotron-Labs-Diffusion export (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')}); export a Tandem checkpoint with "
            "scripts/export_hf.py"
        )
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    return model.to(device).eval(), tokenizer
