"""The harness model over an export: its scores equal stock transformers' for the same weights, greedy
self-speculation answers every generation request as AR does, stop sequences end every mode where
they appear, and the offline tasks and the CLI run end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lm_eval.api.instance import Instance

from data.eval_tasks import TASKS, write_tasks
from tests.factories import export_in_transformers
from tests.model.test_hf_export import save_checkpoint, tiny
from train.convert import export_checkpoint
from train.evaluation import Tandem

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MASK = 2  # the tiny checkpoints' mask token (save_checkpoint)
MODES = ("ar", "diffusion", "self_spec", "self_spec_fused")


@pytest.fixture(scope="module")
def checkpoint(megatron_single, demo_data, tmp_path_factory):
    """(config, checkpoint, export) of a random tiny model (vocabulary 4096, the demo tokenizer)."""
    root = tmp_path_factory.mktemp("evaluation")
    cfg = tiny(4096, max_position_embeddings=128)
    save_checkpoint(root / "ckpt", cfg, demo_data / "tokenizer", block_size=8, seed=3)
    return cfg, root / "ckpt", export_checkpoint(root / "ckpt", root / "hf")


@pytest.fixture(scope="module")
def stock(checkpoint):
    """The export's weights in transformers' own Llama class."""
    cfg, _, export = checkpoint
    return export_in_transformers(cfg, export).double()


def stock_log_probs(stock, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) from the stock model, over the vocabulary without the mask token
    (whose column is dropped, the ids above it shifting down by one)."""
    with torch.no_grad():
        logits = stock(input_ids=torch.tensor([ids])).logits[0]  # [S, V]
    keep = [t for t in range(logits.shape[-1]) if t != MASK]
    log_probs = torch.log_softmax(logits[:, keep], dim=-1)
    targets = torch.tensor([t - (t > MASK) for t in ids[1:]])
    return log_probs[:-1].gather(-1, targets[:, None]).squeeze(-1)


def request(kind: str, *args, doc_id: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("test", doc_id, 1))


CONTINUATIONS = [
    ("The river", " flows to the sea"),
    ("In 1905, the", " physicist published"),
    ("A", " b"),
    ("Photosynthesis is the process by which plants", " make sugar."),
]


def test_loglikelihoods_equal_stock_transformers(checkpoint, stock):
    lm = Tandem(pretrained=str(checkpoint[2]), dtype="float64", batch_size=3)
    tokenizer = lm.tokenizer
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in CONTINUATIONS], disable_tqdm=True)
    for (context, continuation), (log_prob, greedy) in zip(CONTINUATIONS, got, strict=True):
        whole = tokenizer(context + continuation)["input_ids"]
        n = len(whole) - len(tokenizer(context)["input_ids"])
        expected = stock_log_probs(stock, whole)[-n:]
        assert log_prob == pytest.approx(float(expected.sum()), abs=1e-9)
        assert greedy is False  # a random model's argmax is not this text
    empty = lm.loglikelihood([request("loglikelihood", "", " the sea")], disable_tqdm=True)[0][0]
    # An empty context is conditioned on the prefix token (<|endoftext|>, id 0) alone.
    ids = [0, *tokenizer(" the sea", add_special_tokens=False)["input_ids"]]
    assert empty == pytest.approx(float(stock_log_probs(stock, ids).sum()), abs=1e-9)


def test_rolling_loglikelihood_sums_disjoint_windows_of_the_stock_model(checkpoint, stock):
    window = 16
    lm = Tandem(pretrained=str(checkpoint[2]), dtype="float64", max_length=window)
    text = (
        "The river flows past the old mill and under the stone bridge, where children play in summer "
        "and the herons wait for fish in the shallow water below the weir."
    )
    # The text scored after the prefix token (<|endoftext|>), which the tokenizer itself puts in front.
    sequence = lm.tokenizer(text)["input_ids"]
    assert sequence[0] == lm.prefix_token_id and len(sequence) > 2 * window + 1
    # Windows end after every 16 predicted tokens and at the text's end; each predicts its new tokens
    # from the (at most) 16 tokens before its end, the first one from the prefix token on.
    n = len(sequence) - 1
    ends = [*range(window, n, window), n]
    expected = sum(
        float(stock_log_probs(stock, sequence[max(0, end - window) : end + 1])[-(end - start) :].sum())
        for start, end in zip([0, *ends[:-1]], ends, strict=True)
    )
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert got[0] == pytest.approx(expected, abs=1e-9)


PROMPTS = ["The river", "In 1905, the", "Photosynthesis is", "Words: stone apple\nCopy:"]


def generate(lm: Tandem, until: list[str], max_gen_toks: int = 16) -> list[str]:
    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    requests = [request("generate_until", p, kwargs, doc_id=i) for i, p in enumerate(PROMPTS)]
    return lm.generate_until(requests, disable_tqdm=True)


def in_request_order(lm: Tandem) -> list:
    return sorted(lm.generations, key=lambda r: r.doc_id)  # recorded batch by batch, longest first


@pytest.mark.parametrize("mode", MODES)
def test_stop_sequences_end_every_mode_where_they_first_appear(checkpoint, mode):
    options = {} if mode == "ar" else {"block_length": 4}
    lm = Tandem(pretrained=str(checkpoint[2]), mode=mode, dtype="float64", batch_size=4, **options)
    free = generate(lm, until=[])
    free_ids = [r.ids for r in in_request_order(lm)]
    assert all(len(ids) == 16 for ids in free_ids)  # a random model emits no EOS here
    # A stop string from the middle of the first answer: the text of its 10th-12th characters.
    stop = free[0][10:12]
    lm.generations.clear()
    stopped = generate(lm, until=[stop])
    for text, full, ids, record in zip(stopped, free, free_ids, in_request_order(lm), strict=True):
        assert text == full.split(stop)[0]
        if stop in full:  # decoding ended at the first token whose text completes the stop string
            first = next(k for k in range(1, len(ids) + 1) if stop in lm.tok_decode(ids[:k]))
            assert record.ids == ids[:first]
        assert record.nfe >= 1 and record.tpf == record.tokens / record.nfe
    assert in_request_order(lm)[0].tokens < 16


GENERATION_TASKS = ["tandem_arithmetic", "tandem_copy"]


def run_tasks(checkpoint, tasks_dir, mode: str, tasks: list[str], **options):
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = Tandem(pretrained=str(checkpoint[2]), mode=mode, dtype="float64", batch_size=4, **options)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        # The offline tasks only: indexing the harness's own thousands of task files takes a minute here.
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        limit=3,
        log_samples=True,
    )
    return lm, results


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"), count=8)


def answers(results) -> dict:
    return {
        (task, s["doc_id"]): s["resps"]
        for task, samples in results["samples"].items()
        if task in GENERATION_TASKS
        for s in samples
    }


def test_greedy_self_speculation_answers_every_request_as_ar(checkpoint, tasks_dir):
    ar_lm, ar = run_tasks(checkpoint, tasks_dir, "ar", [*GENERATION_TASKS, "tandem_cloze", "tandem_heldout"])
    reference = answers(ar)
    assert len(reference) == 6
    for mode in ("self_spec", "self_spec_fused"):
        lm, results = run_tasks(checkpoint, tasks_dir, mode, GENERATION_TASKS, block_length=4)
        assert answers(results) == reference, mode
        assert [r.ids for r in lm.generations] == [r.ids for r in ar_lm.generations]
    summary = ar_lm.generation_summary()
    assert summary["requests"] == 6 and summary["tpf"] <= 1.0  # AR: one token per pass after the prefill
    assert 0 < ar["results"]["tandem_heldout"]["word_perplexity,none"] < float("inf")


def test_the_offline_tasks_are_reproducible_and_name_their_licences(tmp_path):
    first = write_tasks(tmp_path / "a", count=5, seed=1)
    second = write_tasks(tmp_path / "b", count=5, seed=1)
    for name in TASKS:
        assert (first / f"{name}.jsonl").read_text() == (second / f"{name}.jsonl").read_text()
        assert "license:" in (first / f"{name}.yaml").read_text()
    for line in (first / "tandem_cloze.jsonl").read_text().splitlines():
        doc = json.loads(line)
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
    for line in (first / "tandem_arithmetic.jsonl").read_text().splitlines():
        doc = json.loads(line)
        a, b = (int(w.rstrip("?")) for w in doc["question"].split() if w.rstrip("?").isdigit())
        assert int(doc["answer"]) == a + b


def test_a_checkpoint_folder_is_exported_on_the_fly(checkpoint):
    _, folder, export = checkpoint
    lm = Tandem(pretrained=str(folder), dtype="float64")
    direct = Tandem(pretrained=str(export), dtype="float64")
    assert lm.pretrained != str(export)
    args = [request("loglikelihood", "The river", " flows")]
    assert lm.loglikelihood(args, disable_tqdm=True) == direct.loglikelihood(args, disable_tqdm=True)


def test_the_cli_writes_results_and_a_table_per_mode(checkpoint, tasks_dir, tmp_path, capsys):
    from scripts import evaluate

    out = tmp_path / "eval"
    args = ["--model", str(checkpoint[2]), "--tasks", "tandem_cloze", "tandem_copy", "--limit", "2"]
    args += ["--mode", "ar", "self_spec", "--block-length", "4", "--tasks-dir", str(tasks_dir)]
    assert evaluate.main([*args, "--out", str(out), "--max-gen-toks", "8"]) == 0
    table = (out / "table.md").read_text()
    assert table.strip() in capsys.readouterr().out
    for mode in ("ar", "self_spec"):
        results = json.loads((out / f"results_{mode}.json").read_text())
        assert set(results["results"]) == {"tandem_cloze", "tandem_copy"}
        generation = results["tandem"]["generation"]
        records = results["tandem"]["requests"]
        assert generation["requests"] == len(records) == 2
        assert generation["tpf"] == sum(r["tokens"] for r in records) / sum(r["nfe"] for r in records)
        assert f"| {mode} | tandem_copy | exact_match |" in table
        assert f"| {mode} | tandem_cloze | acc |" in table
