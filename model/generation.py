"""Loading an NLD-format export and decoding prompts with it, for the CLI, the benchmark and the quickstart.

The decoding itself lives in the export's remote code (``model/hf``); this module checks the folder,
encodes prompts exactly as the export's tokenizer does, and times one call per mode.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.hf_config import ARCHITECTURE, MODEL_TYPE

# Mode name -> the export's entry point.
MODES = {
    "ar": "ar_generate",
    "diffusion": "generate",
    "self_spec": "linear_spec_generate",
    # Self-speculation with drafting folded into the verify pass (one pass per iteration).
    "self_spec_fused": "fused_spec_generate",
}


@dataclass
class Generation:
    mode: str
    text: str
    ids: list[int]  # generated ids (prompt excluded)
    nfe: int
    seconds: float
    passes: dict[str, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)

    @property
    def tpf(self) -> float:
        return len(self.ids) / max(self.nfe, 1)

    def as_json(self) -> dict:
        return {
            "mode": self.mode,
            "text": self.text,
            "ids": self.ids,
            "nfe": self.nfe,
            "tpf": self.tpf,
            "seconds": self.seconds,
            "passes": self.passes,
            "accepted": self.accepted,
        }


def load_export(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a Tandem/NLD export folder on ``device``, offline; a clear error for
    anything else."""
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


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """``prompt`` as the exported tokenizer encodes it by default, ``tokenizer(prompt)`` (a Tandem
    tokenizer puts the document-start EOD in front itself), so every path agrees with stock
    transformers token for token."""
    return torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)


def decode(
    model, tokenizer, prompt_ids: torch.Tensor, mode: str, max_new_tokens: int, **options
) -> Generation:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} does not exist; choose one of {', '.join(MODES)}")
    if not hasattr(model, MODES[mode]):
        raise ValueError(
            f"this export's remote code has no {MODES[mode]} (mode {mode!r}); it was written by an older "
            "Tandem: export the checkpoint again with scripts/export_hf.py --overwrite"
        )
    prompt_ids = prompt_ids.to(model.device)
    start = time.perf_counter()
    out, nfe = getattr(model, MODES[mode])(prompt_ids, max_new_tokens=max_new_tokens, **options)
    seconds = time.perf_counter() - start
    new = out[0, prompt_ids.shape[1] :].tolist()
    details = model.last_decoded
    return Generation(
        mode, tokenizer.decode(new), new, nfe, seconds, dict(details.passes), list(details.accepted)
    )
