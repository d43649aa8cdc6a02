"""The Hugging Face export: round trips, logits parity with Megatron and with transformers' own classes,
the export loaded in a clean interpreter, the NLD training call (its noise drawn as the trainer draws
it), and the decoders against plain full-recompute references."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from model import rope
from model.attention import AttentionRealiser
from model.config import AttentionBackend, ModelConfig, ParallelConfig, PrecisionConfig
from model.hf import MODES, decode, encode_prompt, keymap, load_export
from model.hf.config_json import MODEL_TYPE, model_from_hf, nld_config, nld_objective
from model.megatron import build_model, forward
from tandem_kernels import masks, noise
from tandem_kernels.noise import MaskingKind, mask_seed
from tests.factories import export_in_transformers, ministral3_rope, tiny_model
from tests.model.reference_decoding import (
    reference_ar,
    reference_diffusion,
    reference_fused_self_speculation,
    reference_self_speculation,
)
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.convert import export_checkpoint, find_checkpoint, import_hf, load_megatron_state
from train.objectives import ObjectiveConfig

YARN = ministral3_rope(original_max_position_embeddings=32)


PROMPTS = [[0, 17, 250, 31], [0, 900], [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [0]]


def tiny(vocab: int, **overrides) -> ModelConfig:
    return tiny_model(name="tiny-test", vocab_size=vocab, **overrides)


def save_checkpoint(root: Path, model_cfg: ModelConfig, tokenizer: Path, block_size: int, seed: int = 0):
    """A trainer-format checkpoint of a randomly initialised model; returns the Megatron model."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, ParallelConfig(), PrecisionConfig()).eval()
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model, cfg.objective = model_cfg, ObjectiveConfig(block_size=block_size, mask_token_id=2)
    ckpt.save(root, [model], None, ckpt.TrainState(), OmegaConf.to_yaml(cfg), tokenizer=tokenizer)
    return model


@pytest.fixture(scope="module")
def exported(megatron_single, demo_data, tmp_path_factory):
    """(megatron model, its config, export folder) for a random tiny model with the demo tokenizer."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny(4096, qk_layernorm=True)
    model = save_checkpoint(root / "ckpt", cfg, demo_data / "tokenizer", block_size=8)
    out = export_checkpoint(root / "ckpt", root / "hf")
    return model, cfg, out


@pytest.fixture(scope="module")
def hf_model(exported):
    return load_export(exported[2])


def megatron_logits(model, cfg, tokens, positions, predicate):
    attention = AttentionRealiser(cfg, AttentionBackend.sdpa)(positions, predicate, per_sample=False)
    with torch.no_grad():
        out = forward(model, tokens, positions, attention, runtime_gather_output=True)
    return out[..., : cfg.vocab_size]


def test_export_folder_has_the_nld_format(exported):
    _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NemotronLabsDiffusionModel"]
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["auto_map"]["AutoModel"] == "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"
    assert (config["mask_token_id"], config["block_size"], config["tie_word_embeddings"]) == (2, 8, False)
    assert config["rope_parameters"]["rope_type"] == "default"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "encoder.embed_tokens.weight" in names and "diffusion_head.weight" in names
    assert "encoder.layers.1.self_attn.q_norm.weight" in names
    assert {n.split(".")[0] for n in names} == {"encoder", "diffusion_head"}
    assert {"tandem_masks.py", "tandem_rope.py", "tandem_noise.py", "tandem_decoding.py"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "tokenizer.json").is_file()


def test_the_remote_codes_siblings_are_the_modules_tandem_trains_with():
    from model.hf import configuration_nemotron_labs_diffusion as configuration
    from model.hf import modeling_nemotron_labs_diffusion as modeling
    from model.hf import tandem_decoding

    assert sys.modules["model.hf.tandem_masks"] is masks
    assert sys.modules["model.hf.tandem_rope"] is rope
    assert sys.modules["model.hf.tandem_noise"] is noise
    assert modeling.CleanAttention is masks.CleanAttention  # one enum, not a copy of it
    assert tandem_decoding.block_decode is masks.block_decode and modeling.rotate is rope.rotate
    assert configuration.Masking is noise.Masking


def probe(masks, noise) -> dict[str, torch.Tensor]:
    """What a mask module and a noise module give: every predicate on a grid, every masking scheme's
    draws from seeded generators (run on Tandem's modules and on an export's copies)."""
    out = {}
    for clean in masks.CleanAttention:
        out[f"block_diffusion_{clean.value}"] = masks.dense(masks.block_diffusion(16, 4, clean), 32, 32)
    documents = torch.tensor([[0] * 5 + [1] * 10 + [2] * 8])  # over the 23 keys
    predicates = {
        "causal": masks.causal(),
        "bidirectional": masks.bidirectional(),
        "block_decode": masks.block_decode(5),
        "speculate_fused": masks.speculate_fused(3, 4),
        "shifted": masks.shifted(masks.causal(), 3),
        "documents": masks.and_masks(masks.causal(), masks.same_document(documents)),
    }
    for name, predicate in predicates.items():
        out[name] = masks.dense(predicate, 8, 23)
    out["speculate_fused_positions"] = masks.speculate_fused_positions(3, 4)
    loss_mask = torch.ones(3, 16)
    loss_mask[1, 10:] = 0
    for kind in noise.MaskingKind:
        for name, options in {"": {}, "_clipped": {"t_min": 0.3, "t_max": 0.6, "resample": True}}.items():
            scheme = noise.Masking(kind=kind, block_size=4, drafter_fraction=0.3, **options)
            generators = [torch.Generator().manual_seed(noise.mask_seed(1, "valid", i)) for i in range(3)]
            out[f"{kind.value}{name}_masked"], out[f"{kind.value}{name}_p"] = scheme(loss_mask, generators)
    return out


# Run in a fresh interpreter, after the source of ``probe``.
CLEAN_LOAD = """
import importlib.util, sys

# The repository is importable only through its editable install's finder, which goes.
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
TANDEM = ("model", "tandem_kernels", "train", "data")
assert all(importlib.util.find_spec(package) is None for package in TANDEM)
from transformers import AutoModel

folder, out = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
package = type(model).__module__.rsplit(".", 1)[0]
results = probe(sys.modules[package + ".tandem_masks"], sys.modules[package + ".tandem_noise"])
with torch.no_grad():
    results["logits"] = model(torch.arange(3, 40)[None], dlm_paradigm="autoregressive").logits
assert not [name for name in sys.modules if name.split(".")[0] in TANDEM]
torch.save(results, out)
"""


def test_the_export_loads_offline_without_the_repository(exported, hf_model, tmp_path):
    """A fresh interpreter with no network and no Tandem on its path loads the folder, and the mask
    and noise modules shipped in it give what Tandem's own give."""
    _, _, out = exported
    script = "import torch\n\n" + inspect.getsource(probe) + CLEAN_LOAD
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script, str(out), str(tmp_path / "probe.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = torch.load(tmp_path / "probe.pt")
    with torch.no_grad():
        logits = hf_model[0](torch.arange(3, 40)[None], dlm_paradigm="autoregressive").logits
    expected = {**probe(masks, noise), "logits": logits}
    assert shipped.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(shipped[name], tensor), name


# The keys of a shipped NLD config.json, all of which NLD's own remote code may read.
NLD_CONFIG_KEYS = {
    "architectures", "attention_bias", "attention_dropout", "attn_implementation", "block_size",
    "bos_token_id", "dlm_loss_weight", "dlm_paradigm", "dp_varying_mask_ratio", "eos_token_id",
    "head_dim", "hidden_act", "hidden_size", "intermediate_size", "mask_token_id",
    "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "rms_norm_eps", "rope_parameters", "sliding_window", "tie_word_embeddings",
    "vocab_size",
}  # fmt: skip


def test_the_config_holds_every_key_nlds_code_reads_with_values_meaning_no_scaling(exported):
    config = json.loads((exported[2] / "config.json").read_text())
    assert set(config) >= NLD_CONFIG_KEYS
    rope = config["rope_parameters"]
    # NLD scales queries by 1 + beta * log(1 + floor(pos / original_max_position_embeddings)).
    beta, original = rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"]
    positions = torch.tensor([0.0, 255.0, 10_000.0])
    assert torch.equal(1 + beta * torch.log(1 + torch.floor(positions / original)), torch.ones(3))
    assert model_from_hf(config, "reimport").rope == exported[1].rope  # read back: still plain RoPE


def nld_style_linear_spec(model, prompt: list[int], max_new: int, block: int, mask_id: int) -> list[int]:
    """Self-speculation written the way scripts for NLD's HF model drive it: the encoder called with a
    transformers DynamicCache, causal or bidirectional by each layer's ``self_attn.diffusion_lm``."""
    from transformers import DynamicCache

    def greedy(logits):
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
        return logits.argmax(dim=-1)

    def diffusion(flag: bool):
        for layer in model.encoder.layers:
            layer.self_attn.diffusion_lm = flag

    def logits(ids, cache, **kwargs):
        hidden = model.encoder(input_ids=ids, past_key_values=cache, **kwargs)[0]
        return model.diffusion_head(hidden)[0]

    cache = DynamicCache()
    diffusion(False)
    token = int(greedy(logits(torch.tensor([prompt]), cache, use_cache=True, use_causal_mask=True)[-1]))
    out = [token]
    while len(out) < max_new:
        ids = torch.full((1, block), mask_id)
        ids[0, 0] = token
        diffusion(True)
        ids[0, 1:] = greedy(logits(ids, cache, use_cache=False)[1:])
        diffusion(False)
        start = cache.get_seq_length()
        ar = greedy(logits(ids, cache, use_cache=True, use_causal_mask=True)).tolist()
        accepted = 0
        while accepted < block - 1 and ar[accepted] == int(ids[0, accepted + 1]):
            accepted += 1
        cache.crop(start + accepted + 1 - cache.get_seq_length())  # transformers 5: tokens to drop, < 0
        out += [*ids[0, 1 : accepted + 1].tolist(), ar[accepted]]
        token = ar[accepted]
    diffusion(True)
    return out[:max_new]


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=lambda p: f"len{len(p)}")
def test_nld_scripts_module_level_api_gives_our_decoders_output(decode_model, prompt):
    with torch.no_grad():
        expected = decode_model.linear_spec_generate(
            torch.tensor([prompt]), max_new_tokens=14, block_length=4, eos_token_id=[]
        )[0][0, len(prompt) :].tolist()
        assert nld_style_linear_spec(decode_model, prompt, 14, 4, mask_id=2) == expected
        ids = torch.tensor([prompt])
        causal = decode_model(ids, use_causal_mask=True).logits  # NLD's calls without a cache
        bidirectional = decode_model(ids, use_causal_mask=False).logits
        torch.testing.assert_close(causal, decode_model(ids, dlm_paradigm="autoregressive").logits)
        torch.testing.assert_close(bidirectional, decode_model(ids, dlm_paradigm="bidirectional").logits)


def test_every_paradigm_the_config_allows_has_its_mask():
    from model.hf.configuration_nemotron_labs_diffusion import DLM_PARADIGMS
    from model.hf.modeling_nemotron_labs_diffusion import PARADIGM_MASKS

    assert set(PARADIGM_MASKS) == set(DLM_PARADIGMS)


@pytest.mark.parametrize("pattern", ["causal", "block_decode", "training"])
def test_hf_logits_equal_megatron(exported, hf_model, pattern):
    model, cfg, _ = exported
    hf, _ = hf_model
    torch.manual_seed(0)
    S = 32
    tokens = torch.randint(3, cfg.vocab_size, (1, S))
    positions = torch.arange(S)[None]
    mask_mod = {
        "causal": masks.causal(),
        "block_decode": masks.block_decode(24),
        "training": masks.block_diffusion(16, 8),
    }[pattern]
    if pattern == "training":
        positions = torch.arange(16).repeat(2)[None]
    mask = masks.dense(mask_mod, S, S)
    ours = megatron_logits(model, cfg, tokens, positions, mask_mod)
    with torch.no_grad():
        theirs = hf(tokens, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_nld_training_call_returns_the_trainers_loss(exported, hf_model):
    from train.objectives import Joint, reduce

    model, cfg, _ = exported
    hf, _ = hf_model
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, cfg.vocab_size, (2, 17), generator=g)

    class Batch:
        tokens, labels = seq[:, :-1], seq[:, 1:]
        loss_mask = torch.ones(2, 16)
        position_ids = torch.arange(16).expand(2, 16)
        document_ids = None

    masked = torch.rand(2, 16, generator=g) < 0.5
    p = torch.tensor([[0.5], [0.3]]).expand(2, 16)

    class Fixed:
        def __call__(self, loss_mask, generators):
            return masked, p

    objective = Joint(Fixed(), mask_token_id=2, block_size=8, diffusion_weight=0.3, ar_weight=1.0)
    inputs = objective.prepare(Batch, [])
    with torch.no_grad():
        attention = AttentionRealiser(cfg, AttentionBackend.sdpa)(
            inputs.position_ids, inputs.predicate(), inputs.per_sample_mask
        )
        per_token = forward(model, inputs.tokens, inputs.position_ids, attention, labels=inputs.labels)
    reduced = reduce(per_token, inputs)
    with torch.no_grad():
        out = hf(
            Batch.tokens,
            labels=Batch.tokens,
            masked_indices=masked,
            p_mask=p,
            ar_labels=Batch.labels,
            dlm_paradigm="block_diff",
        )
    torch.testing.assert_close(out.loss, reduced.loss_sum / reduced.num_tokens, atol=1e-5, rtol=1e-5)
    assert out.logits.shape == out.causal_logits.shape == (2, 16, cfg.vocab_size)


# The trainer's masking schemes, as objective overrides.
MASKINGS = {
    "sequence": {},
    "block": {"masking": MaskingKind.block},
    "position": {"masking": MaskingKind.position, "half_life_ratio": 0.5},
    "full": {"masking": MaskingKind.full},
    "clipped_resampled": {"masking": MaskingKind.block, "t_min": 0.3, "t_max": 0.5, "resample": True},
    "drafter": {"drafter_fraction": 0.5},
}


@pytest.fixture(scope="module")
def twins(megatron_single):
    """(export-side model's weights, a Megatron GPTModel with the same weights, its config)."""
    from model.hf.modeling_nemotron_labs_diffusion import NemotronLabsDiffusionModel

    cfg = tiny_model(vocab_size=256)  # no padded vocabulary rows: Megatron's softmax is the export's
    torch.manual_seed(4)
    weights = NemotronLabsDiffusionModel(nld_twin_config(cfg, ObjectiveConfig(block_size=8))).state_dict()
    megatron = build_model(cfg, ParallelConfig(), PrecisionConfig()).eval()
    megatron.load_state_dict(keymap.from_hf(weights, cfg, keymap.LAYOUTS[MODEL_TYPE]))
    return weights, megatron, cfg


def nld_twin_config(cfg: ModelConfig, objective: ObjectiveConfig):
    """The export's configuration of ``cfg`` trained with ``objective``, as the export writes it."""
    from model.hf.configuration_nemotron_labs_diffusion import NemotronLabsDiffusionConfig

    json_config = nld_config(
        cfg,
        objective,
        mask_token_id=2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        dtype="float32",
    )
    return NemotronLabsDiffusionConfig(**json_config)


@pytest.mark.parametrize("masking", MASKINGS)
def test_the_training_call_draws_the_trainers_masks_and_gives_its_loss(twins, masking):
    """The export's training call, given the generators the trainer draws a batch's masks with, masks
    the same tokens with the same probabilities and returns the loss of the trainer's step
    (``train.step.forward`` through Megatron, ``train.objectives.reduce``) for every masking scheme."""
    from model.attention import AttentionRealiser
    from model.hf.modeling_nemotron_labs_diffusion import NemotronLabsDiffusionModel
    from train import step
    from train.objectives import build_objective, reduce

    weights, megatron, cfg = twins
    objective_cfg = ObjectiveConfig(block_size=8, **MASKINGS[masking])
    objective = build_objective(objective_cfg, mask_token_id=2)
    export = NemotronLabsDiffusionModel(nld_twin_config(cfg, objective_cfg)).eval()
    export.load_state_dict(weights)
    B, L, seed, samples = 4, 16, 7, [10, 11, 12, 13]
    sequence = torch.randint(3, cfg.vocab_size, (B, L + 1), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(B, L)
    loss_mask[1, 11:] = 0  # never masked, never scored
    batch = SimpleNamespace(
        tokens=sequence[:, :-1],
        labels=sequence[:, 1:],
        loss_mask=loss_mask,
        position_ids=torch.arange(L).expand(B, L),
        document_ids=None,
    )
    context = step.StepContext(
        objective=objective,
        device=torch.device("cpu"),
        attention=AttentionRealiser(cfg, AttentionBackend.sdpa),
        seed=seed,
        rank=0,
        micro_batch_size=B,
        sequence_length=objective.sequence_length(L),
    )
    generators = [torch.Generator().manual_seed(mask_seed(seed, "train", i)) for i in samples]
    with torch.no_grad():
        per_token, inputs = step.forward(context, megatron, batch, "train", samples)
        reduced = reduce(per_token, inputs)
        out = export(
            batch.tokens,
            labels=batch.tokens,
            ar_labels=batch.labels,
            loss_mask=batch.loss_mask,
            dlm_paradigm="block_diff",
            generators=generators,
        )
    masked = inputs.masked[:, :L]
    assert torch.equal(out.masked_indices, masked) and not masked[1, 11:].any()
    inverse_p = torch.where(masked, 1 / out.p_mask, torch.zeros_like(out.p_mask))
    torch.testing.assert_close(inverse_p, inputs.terms["diffusion"].weights[:, :L])
    torch.testing.assert_close(out.loss, reduced.loss_sum / reduced.num_tokens, atol=1e-5, rtol=1e-5)
    if masking == "drafter":  # the scheme really fully masked a row here
        assert (masked == (loss_mask > 0)).all(dim=1).any()


def test_without_masking_options_the_training_call_draws_nlds_noise():
    """A config.json without ``masking`` (NLD's own) draws NLD's noise: one level t per sequence,
    p = (1 - 1e-3) t + 1e-3 for every token of it."""
    from model.hf.configuration_nemotron_labs_diffusion import NemotronLabsDiffusionConfig

    scheme = NemotronLabsDiffusionConfig(block_size=8).noise()
    assert scheme == noise.Masking(kind=MaskingKind.sequence, block_size=8, eps=1e-3, t_min=0.0, t_max=1.0)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    masked, p = scheme(torch.ones(3, 16), generators)
    for row, generator in enumerate(torch.Generator().manual_seed(i) for i in range(3)):
        t = torch.rand(1, generator=generator)  # the level, then the draws, from the row's generator
        assert torch.allclose(p[row], ((1 - 1e-3) * t + 1e-3).expand(16))
        assert torch.equal(masked[row], torch.rand(16, generator=generator) < p[row])
    with pytest.raises(ValueError, match="kind is one of sequence, block, position, full"):
        NemotronLabsDiffusionConfig(masking={"kind": "everything"})


def test_config_json_records_the_objective_and_reads_it_back():
    objective = ObjectiveConfig(block_size=16, masking=MaskingKind.position, t_min=0.1, drafter_fraction=0.2)
    objective.clean_attention, objective.diffusion_weight = masks.CleanAttention.block_causal, 0.5
    written = nld_config(
        tiny_model(),
        objective,
        mask_token_id=2,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=None,
        dtype="float32",
    )
    assert written["masking"] == {
        "kind": "position",
        "eps": 1e-3,
        "t_min": 0.1,
        "t_max": 1.0,
        "resample": False,
        "half_life_ratio": 0.25,
        "drafter_fraction": 0.2,
    }
    fields = ("block_size", "clean_attention", "ar_weight", "diffusion_weight", "masking", "eps", "t_min")
    read = nld_objective(written)
    assert {k: read[k] for k in fields} == {k: getattr(objective, k) for k in fields}
    # NLD's own config.json: no masking options, no loss weight.
    nld = {k: v for k, v in written.items() if k not in ("masking", "dlm_loss_weight", "clean_attention")}
    assert ObjectiveConfig(**nld_objective(nld)) == ObjectiveConfig(block_size=16, diffusion_weight=0.3)


def test_round_trip_megatron_hf_megatron_is_exact(exported, tmp_path):
    model, _, out = exported
    back = import_hf(out, tmp_path / "back")
    original = {k: v for k, v in keymap.without_extra_state(model.state_dict()).items()}
    again = load_megatron_state(find_checkpoint(back))
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", {}), ("ministral3", {"rope": YARN, "kv_channels": 32})],
    ids=["llama", "ministral3-yarn"],
)
def test_transformers_classes_reproduce_the_export(megatron_single, demo_data, tmp_path, family, overrides):
    """An external check: the exported encoder, renamed into transformers' own classes, gives the same
    causal logits as Tandem's remote code."""
    cfg = tiny(4096, **overrides)
    save_checkpoint(tmp_path / "ckpt", cfg, demo_data / "tokenizer", block_size=8, seed=1)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    ours, _ = load_export(out)
    reference = export_in_transformers(cfg, out, family)
    tokens = torch.randint(3, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        got = ours(tokens, dlm_paradigm="autoregressive").logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- decoding ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decode_model(exported):
    model, _ = load_export(exported[2], dtype=torch.float64)  # fp64: no near-tie flips between passes
    return model


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
@pytest.mark.parametrize("max_new", [1, 7, 24])
def test_self_speculation_is_lossless_on_a_random_model(decode_model, prompt, max_new):
    ids = torch.tensor([prompt])
    ar, _ = decode_model.ar_generate(ids, max_new_tokens=max_new, eos_token_id=[])
    for block in (2, 4, 8):
        spec, _ = decode_model.linear_spec_generate(
            ids, max_new_tokens=max_new, block_length=block, eos_token_id=[]
        )
        assert spec.tolist() == ar.tolist(), block
        fused, _ = decode_model.fused_spec_generate(
            ids, max_new_tokens=max_new, block_length=block, eos_token_id=[]
        )
        assert fused.tolist() == ar.tolist(), ("fused", block)


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=lambda p: f"len{len(p)}")
def test_cached_decoders_equal_full_recompute_references(decode_model, prompt):
    ids, mask_id, no_eos = torch.tensor([prompt]), 2, set()
    got = decode_model.ar_generate(ids, max_new_tokens=12, eos_token_id=[])[0][0, len(prompt) :].tolist()
    assert got == reference_ar(decode_model, prompt, 12, mask_id, no_eos)
    for block, threshold in ((4, 0.9), (8, 0.0), (8, 0.01)):
        got = decode_model.generate(
            ids, max_new_tokens=12, block_length=block, threshold=threshold, eos_token_id=[]
        )[0][0, len(prompt) :].tolist()
        assert got == reference_diffusion(decode_model, prompt, 12, mask_id, no_eos, block, threshold), (
            block,
            threshold,
        )
    for block in (4, 8):
        got = decode_model.linear_spec_generate(ids, max_new_tokens=12, block_length=block, eos_token_id=[])[
            0
        ][0, len(prompt) :].tolist()
        assert got == reference_self_speculation(decode_model, prompt, 12, mask_id, no_eos, block)
        got = decode_model.fused_spec_generate(ids, max_new_tokens=12, block_length=block, eos_token_id=[])[
            0
        ][0, len(prompt) :].tolist()
        assert got == reference_fused_self_speculation(decode_model, prompt, 12, mask_id, no_eos, block)


def test_tokens_per_forward_counts_every_pass(decode_model):
    ids = torch.tensor([PROMPTS[0]])
    _, nfe = decode_model.ar_generate(ids, max_new_tokens=10, eos_token_id=[])
    assert nfe == 10  # prefill yields the first token
    _, nfe = decode_model.generate(ids, max_new_tokens=16, block_length=8, threshold=2.0, eos_token_id=[])
    # threshold > 1 commits one token per pass: 7 denoising passes per block, one append between blocks.
    assert nfe == 1 + 7 + 1 + 7 and decode_model.last_decoded.passes == {
        "prefill": 1,
        "denoise": 14,
        "append": 1,
    }
    _, nfe = decode_model.linear_spec_generate(ids, max_new_tokens=16, block_length=8, eos_token_id=[])
    details = decode_model.last_decoded
    assert nfe == 1 + details.passes["draft"] + details.passes["verify"]
    assert len(details.accepted) == details.passes["verify"]
    _, nfe = decode_model.fused_spec_generate(ids, max_new_tokens=16, block_length=8, eos_token_id=[])
    details = decode_model.last_decoded
    # One pass per iteration, each emitting the kept drafts plus one AR token; the prefill drafts too.
    assert details.passes == {"prefill": 1, "verify": nfe - 1} and len(details.accepted) == nfe - 1
    assert len(details.tokens) == 1 + sum(a + 1 for a in details.accepted)


def test_fused_pre_drafts_equal_separate_draft_passes(decode_model):
    """Pre-draft block k of one fused pass gives the logits of a separate bidirectional pass over the
    prefix, draft tokens 0..k and a block of masks (what the two-pass decoder would draft next)."""
    from tandem_kernels.masks import block_decode, causal, speculate_fused, speculate_fused_positions

    decoding = sys.modules[type(decode_model).__module__.rsplit(".", 1)[0] + ".tandem_decoding"]
    mask_id, D, prompt = 2, 4, PROMPTS[2]
    draft = [40, 41, 42, 43]

    def run(cache, tokens, predicate, write, positions=None):
        request = decoding.Request("test", torch.tensor(tokens), predicate, write, positions)
        return decoding.run_pass(decode_model._step, cache, [request], torch.device("cpu"))[0]

    def prefilled():
        cache = decoding.KVCache(1, 64)
        run(cache, prompt, causal(), True)
        return cache

    P = len(prompt)
    with torch.no_grad():
        fused = run(
            prefilled(),
            draft + [mask_id] * D * D,
            speculate_fused(P, D),
            True,
            speculate_fused_positions(P, D),
        )
        verify = run(prefilled(), draft, causal(), False)
        torch.testing.assert_close(fused[:D], verify, atol=1e-10, rtol=1e-10)
        for k in range(D):
            cache = prefilled()
            run(cache, draft[: k + 1], causal(), True)
            separate = run(cache, [mask_id] * D, block_decode(P + k + 1), False)
            torch.testing.assert_close(fused[D + k * D : D + (k + 1) * D], separate, atol=1e-10, rtol=1e-10)


def test_the_mask_token_is_never_emitted(exported, tmp_path):
    _, _, out = exported
    model, _ = load_export(out, dtype=torch.float64)
    with torch.no_grad():
        model.diffusion_head.weight[2] = (
            model.diffusion_head.weight.abs().max() * 50 * torch.sign(model.encoder.norm.weight)
        )  # the mask token now dominates every logit
    ids = torch.tensor([PROMPTS[0]])
    for mode in MODES:
        options = {"threshold": 0.5} if mode == "diffusion" else {}
        out_ids, _ = model.decode(ids, mode, max_new_tokens=20, eos_token_id=[], **options)
        assert 2 not in out_ids[0, len(PROMPTS[0]) :].tolist(), mode


def test_eos_stops_every_mode(decode_model):
    ids = torch.tensor([PROMPTS[1]])
    for mode in MODES:
        options = {"block_length": 4} if mode == "diffusion" else {}
        full = decode_model.decode(ids, mode, max_new_tokens=20, eos_token_id=[], **options)[0][
            0, 2:
        ].tolist()
        eos = full[9]  # EOS changes only when decoding stops, not what is decoded before it
        stop = full.index(eos)
        out, _ = decode_model.decode(ids, mode, max_new_tokens=20, eos_token_id=eos, **options)
        assert out[0, 2:].tolist() == full[: stop + 1], mode


def test_sampling_is_reproducible_and_never_emits_the_mask(decode_model):
    ids = torch.tensor([PROMPTS[0]])
    for mode in MODES:
        a, b = (
            decode_model.decode(
                ids, mode, 16, temperature=1.0, eos_token_id=[], generator=torch.Generator().manual_seed(5)
            )[0]
            for _ in range(2)
        )
        assert a.tolist() == b.tolist() and 2 not in a[0, 4:].tolist(), mode


# NLD's entry point of each mode, with options that differ from the mode's defaults.
ENTRY_POINTS = {
    "ar": ("ar_generate", {}),
    "diffusion": ("generate", {"block_length": 4, "threshold": None, "steps": 2}),
    "self_spec": ("linear_spec_generate", {"block_length": 4, "threshold": 0.5, "verification": "exact"}),
    "self_spec_fused": ("fused_spec_generate", {"block_length": 4, "redraft": True}),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_entry_point_decodes_in_its_mode(decode_model, mode):
    """The published entry points are ``decode`` in one mode each, options passed through: greedy and
    sampled outputs and the passes by kind are the same both ways."""
    name, options = ENTRY_POINTS[mode]
    ids = torch.tensor([PROMPTS[0], [0, 0, 0, 900]])
    padding = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])

    def run(entry_point, *mode_argument, temperature):
        common = dict(temperature=temperature, attention_mask=padding, eos_token_id=[], **options)
        generator = torch.Generator().manual_seed(3)
        out, nfe = entry_point(ids, *mode_argument, max_new_tokens=12, generator=generator, **common)
        return out.tolist(), nfe, [row.passes for row in decode_model.last_decoded_rows]

    for temperature in (0.0, 1.0):
        published = run(getattr(decode_model, name), temperature=temperature)
        assert published == run(decode_model.decode, mode, temperature=temperature), temperature


def test_the_modes_take_their_decoders_options():
    assert MODES["ar"].options == ()
    assert MODES["diffusion"].options == ("block_length", "threshold", "steps")
    assert MODES["self_spec"].options == ("block_length", "threshold", "draft_steps", "verification")
    assert MODES["self_spec_fused"].options == ("block_length", "verification", "redraft")
    assert [mode.lookahead for mode in MODES.values()] == [1, 1, 1, 2]  # fused pre-drafts a block ahead
    with pytest.raises(ValueError, match="threshold does not apply to mode self_spec_fused"):
        MODES["self_spec_fused"].decoder(8, threshold=0.5)
    with pytest.raises(ValueError, match="trained with blocks of 8 tokens"):
        MODES["diffusion"].decoder(8, block_length=16)


# ---- bad input ---------------------------------------------------------------------------------------


def run_generate(capsys, *argv: str) -> tuple[int, str, str]:
    """scripts/generate.py's ``main`` in this process: (exit status, stdout, stderr)."""
    from scripts import generate as cli

    try:
        status = cli.main(list(argv))
    except SystemExit as exit:  # argparse's errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_generate_cli_json_and_bad_input(exported, demo_data, capsys):
    out = str(exported[2])
    status, stdout, stderr = run_generate(
        capsys,
        "--model",
        out,
        "--mode",
        "self_spec",
        "--prompt",
        "The river",
        "--max-new-tokens",
        "9",
        "--json",
    )
    assert status == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert set(result) == {"text", "ids", "nfe", "tpf", "seconds"} and len(result["ids"]) == 9
    assert result["tpf"] == pytest.approx(9 / result["nfe"])
    cases = [
        (["--model", str(demo_data / "tokenizer"), "--mode", "ar", "--prompt", "x"], "no config.json"),
        (["--model", out, "--mode", "beam", "--prompt", "x"], "invalid choice: 'beam'"),
        (["--model", out, "--mode", "ar", "--prompt", "word " * 400], "exceeds the context of 256"),
        (
            ["--model", out, "--mode", "diffusion", "--prompt", "x", "--block-length", "32"],
            "trained with blocks of 8",
        ),
        (
            ["--model", out, "--mode", "self_spec_fused", "--prompt", "x", "--threshold", "0.5"],
            "--threshold does not apply to self_spec_fused",
        ),
        (["--model", out, "--mode", "ar", "--prompt", "x", "--block-length", "4"], "--block-length does not"),
    ]
    for args, message in cases:
        status, _, stderr = run_generate(capsys, *args)
        assert status != 0 and message in stderr, (args, stderr[-500:])


def test_a_folder_that_is_not_an_nld_export_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ValueError, match="not a Nemotron-Labs-Diffusion export"):
        load_export(tmp_path)


def test_generation_helper_encodes_and_times(exported, hf_model):
    model, tokenizer = hf_model
    prompt = encode_prompt(tokenizer, "Hello")
    assert prompt[0, 0].item() == tokenizer.bos_token_id
    result = decode(model, tokenizer, prompt, "diffusion", 10, block_length=4, threshold=0.9)
    assert len(result.ids) == 10 and result.nfe == sum(result.passes.values()) and result.seconds > 0
    with pytest.raises(ValueError, match="mode 'beam' does not exist"):
        decode(model, tokenizer, prompt, "beam", 10)
