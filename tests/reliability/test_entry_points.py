"""Bad inputs at the other entry points, each a one-line named error: export from a damaged checkpoint,
import of pickled weights (never unpickled) or of a config.json whose sizes are not the weights',
decoding with nothing to generate or past the context."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from model.config import ParallelConfig, PrecisionConfig
from model.megatron import build_model
from tests.factories import tiny_model, tiny_nld_model
from tests.model.test_convert import TINY, _config_yaml, tokenizer  # noqa: F401  (a fixture)
from train import checkpoint as ckpt


@pytest.fixture(scope="module")
def saved(megatron_single, tokenizer, tmp_path_factory) -> Path:  # noqa: F811
    """A checkpoint root holding two saves of a tiny model (steps 1 and 2)."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    model_cfg = tiny_model(**TINY)
    model = build_model(model_cfg, ParallelConfig(), PrecisionConfig())
    for step in (1, 2):
        ckpt.save(
            root, [model], None, ckpt.TrainState(step=step), _config_yaml(model_cfg), tokenizer=tokenizer
        )
    return root


def export(checkpoint: Path, out: Path, capsys) -> tuple[int, str]:
    from scripts.export_hf import main

    code = main(["--checkpoint", str(checkpoint), "--out", str(out)])
    return code, capsys.readouterr().err


def damaged_copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def test_export_of_a_damaged_newest_checkpoint_names_it_and_the_intact_one(saved, tmp_path, capsys):
    root = damaged_copy(saved, tmp_path)
    shard = next((root / "iter_0000002").glob("*.distcp"))
    shard.write_bytes(os.urandom(shard.stat().st_size))  # same size: only the checksum sees it
    code, err = export(root, tmp_path / "hf", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: CheckpointUnreadable") and "does not match its sha256" in err
    assert "--checkpoint" in err and "iter_0000001" in err
    assert not (tmp_path / "hf").exists()
    code, _ = export(root / "iter_0000001", tmp_path / "hf", capsys)  # the older one, named, exports
    assert code == 0


@pytest.mark.parametrize("damage", ["garbage", "another tokenizer"])
def test_export_with_a_damaged_tokenizer_copy_is_named(saved, tmp_path, capsys, damage):
    root = damaged_copy(saved, tmp_path)
    manifest = json.loads((root / "iter_0000002" / ckpt.MANIFEST).read_text())
    if damage == "garbage":
        (root / ckpt.TOKENIZER / "tokenizer.json").write_bytes(os.urandom(300))
    else:  # the manifest records another tokenizer than the copy beside it
        manifest["tokenizer_fingerprint"] = "0" * 64
        (root / "iter_0000002" / ckpt.MANIFEST).write_text(json.dumps(manifest))
    code, err = export(root / "iter_0000002", tmp_path / "hf", capsys)
    assert code == 2 and err.startswith("error: CheckpointUnreadable") and "tokenizer copy" in err, err


def llama_folder(folder: Path, **config) -> Path:
    folder.mkdir()
    values = dict(
        model_type="llama",
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        vocab_size=64,
    )
    (folder / "config.json").write_text(json.dumps({**values, **config}))
    return folder


def test_import_refuses_pickled_weights_without_unpickling_them(tmp_path, capsys, monkeypatch):
    from scripts.import_hf import main

    folder = llama_folder(tmp_path / "hf")
    torch.save({"model.embed_tokens.weight": torch.zeros(64, 16)}, folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    assert main(["--hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin are pickles" in err and "never unpickled" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (dict(hidden_size=2**30), "config does not belong to them"),
        (dict(num_hidden_layers=4096), "num_hidden_layers=4096 but the weights hold 1 layers"),
        (dict(vocab_size=-1), "vocab_size=-1: expected a positive integer"),
        (dict(intermediate_size="big"), "intermediate_size='big': expected a positive integer"),
    ],
)
def test_import_refuses_sizes_that_are_not_the_weights_before_allocating(tmp_path, capsys, config, why):
    from safetensors.torch import save_file

    from scripts.import_hf import main

    folder = llama_folder(tmp_path / "hf", **config)
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(64, 16),
            "model.layers.0.mlp.down_proj.weight": torch.zeros(16, 32),
        },
        str(folder / "model.safetensors"),
    )
    assert main(["--hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and why in err and len(err.strip().splitlines()) == 1, err


class _Tokenizer:
    def decode(self, ids):
        return ""


@pytest.mark.parametrize(
    ("prompt_length", "max_new_tokens", "why"),
    [
        (4, 0, "max_new_tokens=0 must be >= 1"),
        (4, -3, "max_new_tokens=-3 must be >= 1"),
        (300, 8, "a prompt of 300 tokens plus 8 new tokens .* exceeds the context of 256"),
        (250, 8, "exceeds the context of 256 positions; shorten the prompt or ask for fewer tokens"),
    ],
)
def test_decoding_refuses_nothing_to_generate_and_overlong_requests(prompt_length, max_new_tokens, why):
    """The export's decoders check both before any pass (generate.py prints the message as its error)."""
    from model.hf import decode

    model = tiny_nld_model()
    with pytest.raises(ValueError, match=why):
        decode(model, _Tokenizer(), torch.ones(1, prompt_length, dtype=torch.long), "ar", max_new_tokens)
