"""The exported model's decoders on the simulated accelerator (tests/device_strict.py): every mode,
greedy and sampled, with the model, the prompt and the sampling generator on the device, must decode
without mixing devices, and give exactly the tokens and pass counts the same model gives on the CPU
(the CPU run is the reference for the values)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.device_strict import GPU, simulated_gpu, to_host
from tests.factories import tiny_nld_model

# Settings: (mode, its options).
SETTINGS = {
    "ar": ("ar", {}),
    "diffusion": ("diffusion", {"block_length": 4, "threshold": 0.3}),
    "diffusion_steps": ("diffusion", {"block_length": 4, "threshold": None, "steps": 2}),
    "self_spec": ("self_spec", {"block_length": 4}),
    "self_spec_iterative_draft": ("self_spec", {"block_length": 4, "threshold": 0.5}),
    "self_spec_fused": ("self_spec_fused", {"block_length": 4}),
}
PROMPT = [1, 17, 40, 9, 33]


@pytest.fixture(scope="module")
def model():
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "llama_4_scaling_beta": 0.1,
    }
    return tiny_nld_model(max_position_embeddings=128, block_size=4, qk_layernorm=True, rope_parameters=yarn)


def decode(model, mode: str, options: dict, temperature: float, device) -> tuple[list[int], int, dict]:
    generator = torch.Generator(device=device).manual_seed(7) if temperature > 0 else None
    ids, nfe = model.decode(
        torch.tensor([PROMPT], device=device),
        mode,
        max_new_tokens=11,
        temperature=temperature,
        eos_token_id=[],
        generator=generator,
        **options,
    )
    assert ids.device == (GPU if device == "cuda" else torch.device("cpu"))
    return to_host(ids)[0].tolist(), nfe, dict(model.last_decoded.passes)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_mode_decodes_on_the_device_as_on_the_cpu(model, setting, temperature):
    mode, options = SETTINGS[setting]
    expected = decode(model, mode, options, temperature, "cpu")
    on_device = copy.deepcopy(model)
    with simulated_gpu():
        got = decode(on_device.cuda(), mode, options, temperature, "cuda")
    assert got == expected


def test_the_nld_training_call_runs_on_the_device(model):
    torch.manual_seed(1)
    L = 8
    clean = torch.randint(4, 64, (2, L))
    masked = torch.rand(2, L) < 0.5
    p = torch.full((2, 1), 0.5)
    expected = model(clean, labels=clean, masked_indices=masked, p_mask=p, dlm_paradigm="block_diff").loss
    on_device = copy.deepcopy(model)
    with simulated_gpu():
        out = on_device.cuda()(
            clean.cuda(),
            labels=clean.cuda(),
            masked_indices=masked.cuda(),
            p_mask=p.cuda(),
            dlm_paradigm="block_diff",
        )
        out.loss.backward()
        assert on_device.diffusion_head.weight.grad.device == GPU
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


class CharTokenizer:
    """Enough of a tokenizer for the command line's decode path, inside the tiny model's vocabulary."""

    bos_token_id = 1

    def __call__(self, text: str) -> dict:
        return {"input_ids": [4 + ord(c) % 60 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self_spec", "self_spec_fused"])
def test_the_command_line_samples_on_the_models_device(model, mode):
    from scripts import generate as cli

    def run(on, device: str) -> list[int]:
        argv = ["--model", "-", "--mode", mode, "--prompt", "hello", "--max-new-tokens", "9"]
        args = cli.parse_args([*argv, "--temperature", "0.8", "--seed", "3", "--device", device])
        return cli.generate(on, CharTokenizer(), args).ids

    expected = run(model, "cpu")
    on_device = copy.deepcopy(model)
    with simulated_gpu():
        assert run(on_device.cuda(), "cuda") == expected


def test_a_generator_on_another_device_is_refused_with_the_fix(model):
    on_device = copy.deepcopy(model)
    with simulated_gpu():
        on_device.cuda()
        refused = r"generator is on cpu but the model is on cuda:0.*torch\.Generator\(device=model\.device\)"
        with pytest.raises(ValueError, match=refused):
            on_device.ar_generate(
                torch.tensor([PROMPT], device="cuda"),
                max_new_tokens=3,
                temperature=1.0,
                generator=torch.Generator().manual_seed(0),
            )
