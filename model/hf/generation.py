"""One decode of a loaded export, timed, for the command line, the benchmark, the quickstart and the
golden record; and prompts encoded exactly as the export's tokenizer does.

The decoding itself is the export's remote code; this module times one call of a mode's entry point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

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
