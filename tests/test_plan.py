"""scripts/plan.py against hand counts, the real megatron model, and the published Ministral-3 sizes;
every experiment recipe on its cluster; impossible layouts refused with the reason."""

from __future__ import annotations

import re

import pytest
import torch

from model.config import ModelConfig, ParallelConfig, PrecisionConfig, Recompute
from model.megatron import build_model
from scripts import plan
from tandem_kernels.masks import CleanAttention
from train.config import CONFIG_DIR, compose_config
from train.flops import block_diffusion_pairs, training_flops_per_sample

# The experiment recipes and the cluster each is sized for: (nodes of 8 GPUs, tensor parallel).
RECIPES = {
    "nld_3b_ar2dlm": (1, 1),
    "nld_8b_ar2dlm": (4, 4),
    "nld_14b_ar2dlm": (8, 8),
    "pretrain_3b": (4, 1),
    "pretrain_8b": (8, 4),
    "pretrain_14b": (8, 8),
}
# Recipes sized for a laptop or one GPU (fp32 on CPU, one process).
SMALL_RECIPES = {"smollm2_ar2dlm", "records_demo"}


def small(**overrides) -> ModelConfig:
    """tiny_model with three layers and 24-wide heads (!= hidden / heads, as in Ministral-3-3B); its
    vocabulary of 300 is padded to 384."""
    from tests.factories import tiny_model

    return tiny_model(**{"num_layers": 3, "kv_channels": 24, **overrides})


# ---- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_parameter_count_equals_the_built_megatron_model(megatron_single, qk_layernorm):
    cfg = small(qk_layernorm=qk_layernorm)
    torch.manual_seed(0)
    gpt = build_model(cfg, ParallelConfig(), PrecisionConfig())
    count = plan.count_parameters(cfg)
    assert count.total == sum(p.numel() for p in gpt.parameters())
    assert count.layer == sum(p.numel() for p in gpt.decoder.layers[0].parameters())
    assert count.embedding == gpt.embedding.word_embeddings.weight.numel()
    assert count.output == gpt.output_layer.weight.numel()
    # By hand: QKV 64 x (4 + 2*2) x 24, output 4*24 x 64, SwiGLU 3 x 64 x 160, two RMSNorms 2 x 64
    # (+ QK-norm 2 x 24); embedding and head 384 x 64 each; final norm 64.
    layer = 64 * 8 * 24 + 96 * 64 + 3 * 64 * 160 + 2 * 64 + (2 * 24 if qk_layernorm else 0)
    assert count.total == 2 * 384 * 64 + 3 * layer + 64


# Ministral-3, counted by hand: layers x (QKV + attention output + SwiGLU + 2 RMSNorms) + embedding +
# output head + final norm, with vocabulary 131072, 32 query and 8 key/value heads of 128.
MINISTRAL3 = {
    "3b": 26 * (3072 * 6144 + 4096 * 3072 + 3 * 3072 * 9216 + 2 * 3072) + 2 * 131072 * 3072 + 3072,
    "8b": 34 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 2 * 131072 * 4096 + 4096,
    "14b": 40 * (5120 * 6144 + 4096 * 5120 + 3 * 5120 * 16384 + 2 * 5120) + 2 * 131072 * 5120 + 5120,
}


@pytest.mark.parametrize(
    ("size", "published", "tied"),
    # Mistral's model cards: "3.4B / 8.4B / 13.5B Language Model + 0.4B Vision Encoder" (the vision
    # tower is not part of Tandem's model); the 3B ties its output head to the embedding, Tandem's
    # untied head (NLD's diffusion_head) adds one embedding matrix to it.
    [("3b", 3.4, True), ("8b", 8.4, False), ("14b", 13.5, False)],
)
def test_parameter_counts_match_the_published_ministral3_sizes(size, published, tied):
    count = plan.count_parameters(compose_config([f"model={size}"]).model)
    assert count.total == MINISTRAL3[size]
    language_model = count.total - (count.output if tied else 0)
    # The cards round down to 0.1 B (8.49 B is "8.4B").
    assert published <= language_model / 1e9 < published + 0.1


def test_parameters_per_gpu_under_tensor_and_pipeline_parallelism():
    cfg = compose_config(["experiment=nld_8b_ar2dlm", "parallel.pipeline=2", "launch=8x8"])
    layer = (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) // 4 + 2 * 4096  # norms are not split
    vocab = 131072 * 4096 // 4
    assert plan.stage_parameters(cfg, first=True, last=False) == 17 * layer + vocab
    assert plan.stage_parameters(cfg, first=False, last=True) == 17 * layer + 4096 + vocab


# ---- memory --------------------------------------------------------------------------------------


def test_memory_of_the_8b_recipe_by_hand():
    cfg = compose_config(["experiment=nld_8b_ar2dlm"])
    layout = plan.layout(cfg)
    assert (layout.world, layout.tp, layout.pp, layout.dp, layout.micro_batches) == (32, 4, 1, 8, 64)
    memory, stage = plan.peak_memory(cfg, layout)
    params = 34 * ((4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) // 4 + 2 * 4096) + 2 * 131072 * 1024 + 4096
    assert memory.weights == 2 * params  # bf16
    assert memory.gradients == 4 * params  # fp32 gradient buffer
    assert memory.optimizer == pytest.approx(12 * params / 8)  # fp32 master + 2 moments over DP 8
    assert memory.fp8_weights == 0
    # Per token of the 2 x 4096 sequence: 8h split by sequence parallelism; attention 6nd + 4gd + 4n and
    # SwiGLU 8f split by TP 4.
    per_token = 8 * 4096 / 4 + (6 * 32 * 128 + 4 * 8 * 128 + 4 * 32 + 8 * 14336) / 4
    assert memory.activations == pytest.approx(34 * 8192 * per_token)
    assert memory.logits == pytest.approx(6 * 8192 * 131072 / 4 + 4 * 8192 * 4096 / 4)
    assert memory.total == pytest.approx(
        sum((memory.weights, memory.gradients, memory.optimizer, memory.activations, memory.logits))
        + plan.OVERHEAD
    )
    assert stage == "the only stage"


def test_without_distributed_optimizer_every_rank_holds_adam():
    cfg = compose_config(["experiment=nld_8b_ar2dlm"])
    layout = plan.layout(cfg)
    replicated = compose_config(
        [
            "experiment=nld_8b_ar2dlm",
            "parallel.distributed_optimizer=false",
            "parallel.overlap_param_gather=false",
        ]
    )
    sharded_memory, _ = plan.peak_memory(cfg, layout)
    replicated_memory, _ = plan.peak_memory(replicated, layout)
    assert replicated_memory.optimizer == pytest.approx(8 * sharded_memory.optimizer)


def test_full_recompute_keeps_layer_inputs_and_one_layer():
    cfg = compose_config(["experiment=nld_3b_ar2dlm", "parallel.recompute=full"])
    memory, _ = plan.peak_memory(cfg, plan.layout(cfg))
    tokens, h = 8192, 3072
    full_layer = tokens * (8 * h + 6 * 32 * 128 + 4 * 8 * 128 + 4 * 32 + 8 * 9216)
    assert memory.activations == pytest.approx(26 * 2 * tokens * h + full_layer)


def test_selective_recompute_drops_what_core_attention_makes():
    none = plan.layer_activation_bytes(small(), 100, 1, False, selective=False)
    selective = plan.layer_activation_bytes(small(), 100, 1, False, selective=True)
    assert none - selective == 100 * (2 * 2 * 4 * 24 + 4 * 4)  # attention output + fp32 logsumexp


def test_the_first_pipeline_stage_holds_pp_micro_batches():
    cfg = compose_config(["experiment=nld_8b_ar2dlm", "parallel.pipeline=2", "launch=8x8"])
    layout = plan.layout(cfg)
    first = plan.stage_memory(cfg, layout, first=True, last=False)
    last = plan.stage_memory(cfg, layout, first=False, last=True)
    per_layer = plan.layer_activation_bytes(cfg.model, 8192, 4, True, selective=False)
    assert first.activations == pytest.approx(2 * 17 * per_layer)
    assert last.activations == pytest.approx(17 * per_layer) and first.logits == 0 < last.logits


def test_interleaving_adds_the_schedules_memory_penalty():
    overrides = ["experiment=nld_14b_ar2dlm", "launch.nodes=16", "parallel.pipeline=2"]
    cfg = compose_config([*overrides, "parallel.virtual_pipeline=2"])
    layout = plan.layout(cfg)
    per_layer = plan.layer_activation_bytes(cfg.model, 8192, 8, True, selective=False)
    first = plan.stage_memory(cfg, layout, first=True, last=False)
    assert first.activations == pytest.approx(2 * (1 + 1 / 4) * 20 * per_layer)  # 1 + (PP-1)/(PP*VP)


# ---- FLOPs and time ------------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", list(Recompute))
def test_flops_split_adds_up_to_the_trainers_count(recompute):
    cfg = compose_config(["experiment=nld_8b_ar2dlm", f"parallel.recompute={recompute.value}"])
    flops = plan.sample_flops(cfg)
    pairs = block_diffusion_pairs(4096, 64, CleanAttention.causal)
    assert flops.total == training_flops_per_sample(cfg.model, 8192, pairs, recompute)
    passes = 3 if recompute is Recompute.none else 4
    assert flops.attention == passes * 34 * 2 * 2 * 32 * 128 * pairs
    assert flops.gemm_fp8 == 0


def test_step_time_and_tokens_by_hand():
    cfg = compose_config(["experiment=nld_8b_ar2dlm"])
    result = plan.make_plan(cfg, [plan.GPUS["B200"]], mfu=0.4)
    (b200,) = result.projections
    seconds = 512 * result.flops.total / (32 * 2.25e15 * 0.4)
    assert b200.step_seconds == pytest.approx(seconds)
    assert b200.tokens_per_s == pytest.approx(512 * 4096 / seconds)
    assert b200.problems == ()


def test_fp8_runs_layer_gemms_at_twice_the_peak():
    bf16 = compose_config(["experiment=nld_8b_ar2dlm"])
    fp8 = compose_config(["experiment=nld_8b_ar2dlm", "precision=fp8_current"])
    flops = plan.sample_flops(fp8)
    assert flops.total == plan.sample_flops(bf16).total
    assert flops.gemm_fp8 > 0 and flops.gemm_bf16 == 3 * 2 * 8192 * 4096 * 131072  # the head stays bf16
    h100 = plan.GPUS["H100"]
    expected = 512 * (flops.gemm_fp8 / 2 + flops.gemm_bf16 + flops.attention) / (32 * 989.4e12 * 0.4)
    assert plan.step_seconds(fp8, plan.layout(fp8), h100, 0.4) == pytest.approx(expected)


def test_pipeline_bubble_lengthens_the_step():
    base = compose_config(["experiment=nld_8b_ar2dlm", "launch=8x8"])
    piped = compose_config(["experiment=nld_8b_ar2dlm", "launch=8x8", "parallel.pipeline=2"])
    b200 = plan.GPUS["B200"]
    flat = plan.step_seconds(base, plan.layout(base), b200, 0.4)  # DP 16, 32 micro-batches
    bubbled = plan.step_seconds(piped, plan.layout(piped), b200, 0.4)  # DP 8, 64 micro-batches
    assert bubbled == pytest.approx(flat * (1 + 1 / 64))


# ---- recipes and refusals ------------------------------------------------------------------------


def test_every_experiment_recipe_has_a_cluster_here():
    experiments = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")} - {"quickstart"}
    assert experiments == set(RECIPES) | set(SMALL_RECIPES)


@pytest.mark.parametrize("experiment", sorted(SMALL_RECIPES))
def test_every_small_recipe_fits_one_gpu(experiment, capsys):
    one_gpu = [f"experiment={experiment}", "launch.nodes=1", "launch.gpus_per_node=1"]
    assert compose_config(one_gpu).parallel.tensor == 1
    assert plan.main(["--gpu", "H200", *one_gpu]) == 0
    out = capsys.readouterr().out
    assert "1 node(s) x 1 GPUs = 1: TP 1" in out and "ok, fits" in out


@pytest.fixture(scope="module")
def recipes():
    """Each cluster recipe, composed once for the tests that read it."""
    return {name: compose_config([f"experiment={name}"]) for name in RECIPES}


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_every_recipe_passes_the_planner_on_its_cluster(experiment, recipes, capsys):
    nodes, tp = RECIPES[experiment]
    cfg = recipes[experiment]
    assert (cfg.launch.nodes, cfg.launch.gpus_per_node, cfg.parallel.tensor) == (nodes, 8, tp)
    assert plan.main(["--gpu", "B200", f"experiment={experiment}"]) == 0
    out = capsys.readouterr().out
    assert f"{nodes} node(s) x 8 GPUs = {8 * nodes}: TP {tp}" in out
    assert "B200" in out and "ok, fits" in out


@pytest.mark.parametrize("experiment", sorted(name for name in RECIPES if name.startswith("nld_")))
def test_the_nld_recipes_have_nlds_published_numbers(experiment, recipes):
    cfg = recipes[experiment]
    assert (cfg.objective.block_size, cfg.objective.mask_token_id) == (64, 100)
    assert (cfg.objective.ar_weight, cfg.objective.diffusion_weight) == (1.0, 0.3)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.schedule.value) == (1e-5, 1e-6, "wsd")
    # 1% warmup (not base/pretrain's 2000 steps), the last 20% decaying.
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_fraction, cfg.optim.decay_fraction) == (None, 0.01, 0.2)
    assert (cfg.global_batch_size, cfg.data.seq_length, cfg.steps) == (512, 4096, 12500)
    assert cfg.checkpoint.finetune and cfg.parallel.distributed_optimizer
    assert "TANDEM_INIT_CHECKPOINT" in cfg.checkpoint.load  # a placeholder that names what to set


def test_recipe_inputs_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_INIT_CHECKPOINT", "/ckpt/ministral3-8b")
    monkeypatch.setenv("TANDEM_DATA_PREFIX", "/data/mix_text_document")
    monkeypatch.setenv("TANDEM_TOKENIZER", "/tok/ministral3")
    cfg = compose_config(["experiment=nld_8b_ar2dlm"])
    assert cfg.checkpoint.load == "/ckpt/ministral3-8b"
    assert (cfg.data.prefixes, cfg.data.tokenizer) == (["/data/mix_text_document"], "/tok/ministral3")


ONE_NODE_WITHOUT_TP = ["launch=1x8", "parallel.tensor=1", "parallel.sequence_parallel=false"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["experiment=nld_8b_ar2dlm", "parallel.tensor=3"],
            r"num_attention_heads=32 is not divisible by parallel\.tensor=3",
        ),
        (
            ["experiment=nld_8b_ar2dlm", "launch.nodes=1", "launch.gpus_per_node=6"],
            r"the world size 6 is not divisible by parallel\.tensor=4 x parallel\.pipeline=1",
        ),
        (
            ["experiment=nld_8b_ar2dlm", "global_batch_size=500"],
            r"global_batch_size=500 is not a multiple of micro_batch_size=1 x data-parallel size 8",
        ),
        (
            ["--gpu", "H100", "experiment=nld_14b_ar2dlm", *ONE_NODE_WITHOUT_TP],
            r"H100: needs 1\d\d\.\d GB per GPU on the only stage, more than the 73\.6 GB usable",
        ),
        (
            ["--gpu", "H100", "experiment=nld_8b_ar2dlm", "precision=mxfp8"],
            r"precision\.fp8=mxfp8 does not run on H100 \(compute capability 9\.0; .*B200\)",
        ),
        (["model=tiny"], r"the planner needs the cluster: launch=4x8"),
    ],
)
def test_impossible_layouts_are_refused_with_the_reason(args, reason, capsys):
    assert plan.main(args) == 1
    assert re.search(reason, capsys.readouterr().err)


def test_mxfp8_runs_on_b200(capsys):
    assert plan.main(["--gpu", "B200", "experiment=nld_8b_ar2dlm", "precision=mxfp8"]) == 0
    assert "+ FP8 mxfp8" in capsys.readouterr().out
