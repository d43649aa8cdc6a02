"""The Hugging Face format of Tandem's exports (Nemotron-Labs-Diffusion, NLD), in one package.

Shipped in every export folder, the remote code ``AutoModel.from_pretrained(dir,
trust_remote_code=True)`` runs: ``configuration_nemotron_labs_diffusion``,
``modeling_nemotron_labs_diffusion``, ``tandem_decoding`` (the decoders and their registry ``MODES``),
and beside them three of Tandem's own modules under sibling names (``SIBLINGS``): the attention-mask
predicates, the rotary tables and the noise schemes the trainer draws masks with.

Used here only: ``config_json`` (config.json to and from ``ModelConfig``), ``keymap`` (weight names),
``safetensors_io`` (weight files read and written a tensor at a time), ``load`` (``load_export``, how
every caller opens an export) and ``generation`` (a prompt encoded, one decode timed). Conversions
between training checkpoints and export folders read and write checkpoints, so they live in
``train.convert``.

In the repository the remote code's siblings are the very modules Tandem trains with: they are
registered here under their sibling names, so the remote code's ``from .tandem_masks import ...``
gives ``tandem_kernels.masks`` itself (one ``CleanAttention``, not a second copy of it); an export
copies their files (``REMOTE_CODE``), which is how transformers finds them in the folder.
"""

import sys
from pathlib import Path

from model import rope
from tandem_kernels import masks, noise

# Sibling name in the export folder -> the module Tandem trains with.
SIBLINGS = {"tandem_masks": masks, "tandem_rope": rope, "tandem_noise": noise}
for _name, _module in SIBLINGS.items():
    sys.modules[f"{__name__}.{_name}"] = _module

_SHIPPED = (
    "configuration_nemotron_labs_diffusion.py",
    "modeling_nemotron_labs_diffusion.py",
    "tandem_decoding.py",
)
# File name in an export folder -> its source in this repository.
REMOTE_CODE = {
    **{name: Path(__file__).parent / name for name in _SHIPPED},
    **{f"{name}.py": Path(module.__file__) for name, module in SIBLINGS.items()},
}

# The public entry points; after the aliases, which tandem_decoding's own imports need.
from model.hf.generation import Generation, decode, encode_prompt  # noqa: E402
from model.hf.load import load_export  # noqa: E402
from model.hf.tandem_decoding import MODES, Mode, mode_named  # noqa: E402

__all__ = [
    "MODES",
    "REMOTE_CODE",
    "SIBLINGS",
    "Generation",
    "Mode",
    "decode",
    "encode_prompt",
    "load_export",
    "mode_named",
]
