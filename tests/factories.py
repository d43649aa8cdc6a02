"""Builders shared by several test modules."""

from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig, RopeConfig, RopeType

# A two-layer model small enough for CPU steps in a second, on the demo data's vocabulary.
SMALL_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "data.seq_length=64",
    "objective.block_size=16",
]
# SMALL_MODEL on the demo data with a small batch, a loss per step in metrics.jsonl, a constant learning
# rate after two warmup steps (so a run's trajectory does not depend on its total step count) and no
# checkpoints unless asked for: the trainer tests' runs (a later override of the same key wins).
SMALL_RUN = [
    *SMALL_MODEL,
    "global_batch_size=8",
    "micro_batch_size=4",
    "logging.interval=1",
    "logging.eval_interval=0",
    "logging.tensorboard=false",
    "optim.warmup_steps=2",
    "optim.schedule=constant",
    "checkpoint.interval=0",
]


def tiny_model(**overrides) -> ModelConfig:
    """A 2-layer GQA model (d=64, 4 heads over 2 groups) for in-process tests, vocabulary 300."""
    values = dict(
        name="test",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=160,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    values.update(overrides)
    return ModelConfig(**values)


def ministral3_rope(original_max_position_embeddings: int) -> RopeConfig:
    """Ministral-3's rotary embedding (YaRN x16, Llama-4 query scaling, as configs/model/rope/ministral3)
    from a short original context, so that a test's positions cross it."""
    return RopeConfig(
        rope_type=RopeType.yarn,
        rope_theta=1e6,
        factor=16.0,
        original_max_position_embeddings=original_max_position_embeddings,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        llama_4_scaling_beta=0.1,
    )


def tiny_llama_folder(folder: Path, vocab_size: int, tie_word_embeddings: bool, tokens: int = 250):
    """A Hugging Face folder of a random 2-layer Llama (d=64, GQA 4/2) with a word-level tokenizer of
    ``tokens`` entries ("t0" ... , EOS "t1") and no mask token; ``vocab_size`` > ``tokens`` leaves spare
    embedding rows. Returns the transformers model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"t{i}": i for i in range(tokens)}, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="t1").save_pretrained(str(folder))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return model


def tiny_nld_model(seed: int = 0, **overrides):
    """A randomly initialised 2-layer export-side model (the remote code's class, no checkpoint)."""
    import torch

    from model.hf.configuration_nemotron_labs_diffusion import NemotronLabsDiffusionConfig
    from model.hf.modeling_nemotron_labs_diffusion import NemotronLabsDiffusionModel

    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        mask_token_id=3,
        block_size=8,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return NemotronLabsDiffusionModel(NemotronLabsDiffusionConfig(**values)).eval()


def hf_twin(cfg: ModelConfig, family: str):
    """The transformers model of the same shape (config written out independently of Tandem)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Ministral3Config,
        Ministral3ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_epsilon,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        rope_parameters=cfg.rope.to_hf(),
        attention_dropout=0.0,
    )
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    if family == "ministral3":
        return Ministral3ForCausalLM(Ministral3Config(**common))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, attention_bias=False))
    raise ValueError(family)


def export_in_transformers(cfg: ModelConfig, export, family: str = "llama"):
    """An export's weights (``encoder.*`` -> ``model.*``, ``diffusion_head`` -> ``lm_head``) in
    transformers' own class of ``family``, in eval mode."""
    from safetensors.torch import load_file

    renamed = {
        k.replace("encoder.", "model.", 1).replace("diffusion_head.", "lm_head."): v
        for k, v in load_file(str(export / "model.safetensors")).items()
    }
    reference = hf_twin(cfg, family)
    reference.load_state_dict(renamed, strict=True)
    return reference.eval()
