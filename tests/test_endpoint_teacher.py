"""A teacher that exists only behind an inference engine: answers, soft labels and eval's reference
from a real llama.cpp server on loopback (llama-cpp-python's `python -m llama_cpp.server`).

The served model is a tiny random llama with SmolLM2's tokenizer, exported to an F16 GGUF; the
machine that trains holds only its tokenizer and config. Checked: the server's top-20 against the
same model's local top-20 (PyTorch, fp32), a whole run to eval with no teacher weights, a server
killed mid-way, a server without log-probs, and a tokenizer that is not the served one; and for
on-policy distillation, the server's scores of a student's sampled answers against the local ones.

    .venv/bin/python -m pytest -q tests/test_endpoint_teacher.py
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_tokenizer
from test_generate import free_port, kill_when_answered, start_llama_server

from edgedistill.cli import main
from edgedistill.data import remote
from edgedistill.data.endpoint_labels import (ENDPOINT_TOPK, FILLER_LOGPROB, TokenTable, _row, align_answer,
                                              check_endpoint_tokenizer)
from edgedistill.errors import EdgedistillError
from edgedistill.layout import ANSWERS_PARTIAL_JSONL, TEACHER_TOKENS_JSONL
from edgedistill.recipe import EndpointConfig, RandomModelConfig, Recipe
from edgedistill.runtimes.pytorch import load_model, load_tokenizer
from edgedistill.sources import tokenizer_source
from edgedistill.sources.random_model import build_random_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Is this review positive or negative? I loved every minute of it.",
           "Say hello in French.", "Write one word about the sea.", "Name a colour.", "Count to three."]


# --- unit: naming server tokens, lining answers up ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_table():
    tokenizer = make_tiny_tokenizer()
    return tokenizer, TokenTable(tokenizer)


@pytest.mark.unit
def test_server_tokens_are_named_by_id_bytes_or_text(tiny_table):
    tokenizer, table = tiny_table
    [word] = tokenizer.encode(" ka", add_special_tokens=False)
    assert table.id_of({"token": " ka"}) == word
    assert table.id_of({"token": "ignored", "bytes": list(b" ka")}) == word
    assert table.id_of({"token": "ignored", "id": word}) == word
    assert table.id_of({"token": f"token_id:{word}"}) == word  # vLLM's return_tokens_as_token_ids
    assert table.id_of({"token": "no such token here"}) is None
    assert table.id_of({"token": "x", "id": 10**6}) is None


@pytest.mark.unit
def test_an_answer_lines_up_with_the_teachers_own_tokens(tiny_table):
    tokenizer, table = tiny_table
    ids = tokenizer.encode(" kaka lomi", add_special_tokens=False)
    tokens = [{"id": i, "token": "", "logprob": -1.0, "top": []} for i in ids]
    # the stored answer lost the leading space; the first token keeps it (it is what was generated)
    found, entries = align_answer(tokens, "kaka lomi", table)
    assert found == ids and entries == tokens
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert align_answer(tokens + [{"id": end, "token": "", "logprob": 0.0, "top": []}], "kaka lomi", table)[0] == ids
    assert align_answer(tokens, "something else", table) is None


@pytest.mark.unit
def test_a_row_keeps_the_mapped_alternatives_and_pads_with_distinct_fillers(tiny_table):
    tokenizer, table = tiny_table
    [a], [b] = tokenizer.encode(" ka", add_special_tokens=False), tokenizer.encode(" lo", add_special_tokens=False)
    counts = Counter()
    entry = {"top": [{"token": "?", "id": a, "logprob": -0.1}, {"token": "not a token at all", "logprob": -2.0},
                     {"token": " lo", "logprob": -3.0}]}
    ids, logprobs = _row(entry, table, 4, counts)
    assert ids[:2] == [a, b] and logprobs[:2] == [-0.1, -3.0]
    assert len(set(ids)) == 4 and logprobs[2:] == [FILLER_LOGPROB] * 2
    assert counts["alternatives_unmapped"] == 1


@pytest.mark.unit
def test_a_response_without_logprobs_says_to_use_response_distillation():
    body = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}).encode()
    assert remote.parse_completion(body).text == "hi"
    with pytest.raises(remote.EndpointRefused) as info:
        remote.parse_completion(body, top_logprobs=5)
    assert "kl_weight: 0" in info.value.hint


@pytest.mark.unit
@pytest.mark.parametrize("change, message", [
    ({"generate": {}}, "needs generate.endpoint"),
    ({"student": {"method": "prune", "keep_layers": 1}}, "cannot be pruned"),
    ({"teacher": {"source": "endpoint"}}, "needs 'tokenizer'"),
])
def test_an_endpoint_teacher_recipe_is_checked(change, message):
    recipe = {"name": "r", "task": {"labels": ["a", "b"], "prompt": "{text}"}, "data": {"prompts": "x.jsonl"},
              "teacher": {"source": "endpoint", "tokenizer": "smollm2-135m-instruct"},
              "generate": {"endpoint": {"url": "http://127.0.0.1:1/v1"}},
              "student": {"method": "config", "config": {"num_hidden_layers": 1}}}
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate(recipe | change)


# --- a real llama.cpp server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the served model's HF folder, a folder with only its tokenizer and config, its F16 GGUF)."""
    from edgedistill.export.gguf import write_gguf

    root = tmp_path_factory.mktemp("served")
    model = root / "teacher"
    model.mkdir()
    build_random_model(RandomModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128),
                       tokenizer_source("smollm2-135m-instruct"), model, seed=0)
    files = root / "tokenizer-only"
    files.mkdir()
    for path in model.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, files / path.name)
    return model, files, str(write_gguf(model, root / "teacher-f16.gguf"))


@pytest.fixture
def server(served):
    port = free_port()
    process = start_llama_server(port, served[2])
    yield f"http://127.0.0.1:{port}/v1", process
    process.kill()
    process.wait()


@pytest.mark.integration
def test_the_servers_top_k_agrees_with_the_local_top_k(served, server):
    model_dir, _, _ = served
    url, _ = server
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    table = TokenTable(tokenizer)
    assert check_endpoint_tokenizer(EndpointConfig(url=url), model_dir) == "same ids"
    positions = top1 = 0
    overlap, worst = 0.0, 0.0
    for i, prompt in enumerate(PROMPTS):
        messages = [{"role": "user", "content": prompt}]
        completion = remote.request_once(EndpointConfig(url=url, retries=0), remote.Request((i, 0), messages, 0),
                                         max_new_tokens=16, temperature=0.0, top_logprobs=ENDPOINT_TOPK)
        aligned = align_answer(completion.tokens, completion.text, table)
        if aligned is None:
            # llama-cpp-python's server names tokens by their text alone, and a token that is part
            # of a character has none: that answer is trained on with hard labels (counted)
            assert any(table.id_of(token) is None for token in completion.tokens)
            continue
        ids, entries = aligned
        context = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        with torch.no_grad():
            local = torch.log_softmax(model(torch.tensor([context + ids])).logits[0].double(), -1)
        for j, entry in enumerate(entries):
            row = local[len(context) - 1 + j]
            mine = set(row.topk(ENDPOINT_TOPK).indices.tolist())
            theirs = {table.id_of(a): a["logprob"] for a in entry["top"] if table.id_of(a) is not None}
            positions += 1
            top1 += max(theirs, key=theirs.get) == int(row.argmax())
            overlap += len(mine & set(theirs)) / ENDPOINT_TOPK
            worst = max(worst, max(abs(lp - float(row[t])) for t, lp in theirs.items()))
    assert positions >= 30
    print(f"\n{positions} positions: top-1 agreement {top1 / positions:.3f}, top-{ENDPOINT_TOPK} overlap "
          f"{overlap / positions:.3f}, largest log-prob difference {worst:.4f}")
    # the F16 GGUF rounds the fp32 weights, and a random model's flat distributions have near-ties
    # that the rounding and llama.cpp's arithmetic flip now and then
    assert top1 / positions >= 0.85 and overlap / positions >= 0.9 and worst < 0.1


def endpoint_recipe(folder: Path, url: str, tokenizer: Path, **extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "recipes" / "data", folder / "data", dirs_exist_ok=True)
    text = f"""
name: remote
seed: 0
teacher: {{source: endpoint, tokenizer: {tokenizer}}}
task:
  labels: [positive, negative]
  prompt: "Is this review positive or negative? Answer with one word.\\n\\nReview: {{text}}"
data: {{prompts: data/sentiment.jsonl, heldout_fraction: 0.25, limit: {extra.get('limit', 16)}}}
generate: {{max_new_tokens: 12, endpoint: {{url: '{url}', concurrency: 2, retries: 1}}}}
student: {{method: config, config: {{num_hidden_layers: 1}}}}
distill: {{epochs: 1, batch_size: 4, max_seq_len: 128, topk: 8, warmup_steps: 1}}
export: {{quants: [Q8_0]}}
bench: {{prompt_tokens: 16, gen_tokens: 4, repetitions: 1}}
eval: {{max_new_tokens: 8}}
"""
    (folder / "recipe.yaml").write_text(text)
    return folder / "recipe.yaml"


@pytest.mark.integration
def test_a_run_with_no_teacher_weights_learns_the_servers_soft_labels(served, server, tmp_path):
    _, tokenizer_only, _ = served
    url, _ = server
    out = tmp_path / "run"
    assert main(["run", str(endpoint_recipe(tmp_path / "r", url, tokenizer_only)), "--out", str(out),
                 "--to", "eval"]) == 0
    assert not list((out / "teacher").glob("*.safetensors"))
    generated = json.loads((out / "generate" / "manifest.json").read_text())["result"]
    assert generated["endpoint_tokenizer"] == "same ids"
    meta = json.loads((out / "logits" / "meta.json").read_text())
    assert meta["source"] == "endpoint" and meta["topk"] == 8 and meta["soft_label_positions"] == "answer"
    stats = meta["endpoint"]
    assert stats["answers_aligned"] >= 8 and stats["soft_label_rows"] > 0
    assert stats["generated_tokens_unmapped"] <= 0.05 * stats["generated_tokens"]
    distilled = json.loads((out / "distill" / "manifest.json").read_text())["result"]
    assert distilled["kl_positions"].startswith("answer")
    assert "skipped" in json.loads((out / "teacher_gguf" / "manifest.json").read_text())["result"]
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["reference"]["task_score"] is not None and report["reference"]["examples"] >= 4
    assert {row["artifact"] for row in report["artifacts"]} >= {"student-q8_0.gguf", "student-f16.gguf"}


@pytest.mark.slow
def test_a_server_killed_mid_way_loses_no_answer_and_no_soft_label(served, tmp_path):
    """(about 35 s: in the slow tier to keep the fast suite within 10 minutes; a killed server's
    answers are kept in the fast suite by test_generate's dead-server test)"""
    from edgedistill.data.generate import generate
    from edgedistill.recipe import load_recipe
    from edgedistill.stages import teacher_stage

    model_dir, tokenizer_only, gguf = served
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    process = start_llama_server(port, gguf)
    recipe = load_recipe(endpoint_recipe(tmp_path / "r", url, tokenizer_only, limit="40"))
    teacher, out = tmp_path / "teacher", tmp_path / "generate"
    teacher.mkdir()
    out.mkdir()
    teacher_stage(recipe, teacher)
    partial = out / ANSWERS_PARTIAL_JSONL
    killer = kill_when_answered(partial, 3, process)
    try:
        with pytest.raises(EdgedistillError, match="kept failing"):
            generate(recipe, out, teacher=teacher)
        killer.join()
        kept = [json.loads(line) for line in partial.read_text().splitlines()]
        assert len(kept) >= 3 and all(row["tokens"] for row in kept)
        process.wait()
        process = start_llama_server(port, gguf)
        result = generate(recipe, out, teacher=teacher)
    finally:
        process.kill()
        process.wait()
    tokens = [json.loads(line) for line in (out / TEACHER_TOKENS_JSONL).read_text().splitlines()]
    assert len(tokens) == result["answers"] == 30
    by_key = {(row["id"], row["sample"]): row["tokens"] for row in tokens}
    assert all(by_key[row["id"], row["sample"]] == row["tokens"] for row in kept)


@pytest.mark.integration
def test_a_server_without_logprobs_and_another_tokenizer_are_refused_before_training(served, tmp_path):
    from edgedistill.data.generate import generate
    from edgedistill.recipe import load_recipe
    from edgedistill.stages import teacher_stage

    _, tokenizer_only, gguf = served
    port = free_port()
    process = start_llama_server(port, gguf, "--logits_all", "false")
    url = f"http://127.0.0.1:{port}/v1"
    def refusal(name: str, tokenizer: Path) -> EdgedistillError:
        """The generate stage's error for a run named `name` whose teacher.tokenizer is `tokenizer`."""
        recipe = load_recipe(endpoint_recipe(tmp_path / name, url, tokenizer))
        teacher, out = tmp_path / name / "teacher", tmp_path / name / "generate"
        teacher.mkdir()
        out.mkdir()
        teacher_stage(recipe, teacher)
        with pytest.raises(EdgedistillError) as info:
            generate(recipe, out, teacher=teacher)
        return info.value

    try:
        error = refusal("no-logprobs", tokenizer_only)
        assert "logits_all" in str(error) and "kl_weight: 0" in error.hint
        other = tmp_path / "other"
        make_tiny_tokenizer(other)
        (other / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
        error = refusal("other-tokenizer", other)
        assert "not teacher.tokenizer's" in str(error) and "kl_weight: 0" in error.hint
    finally:
        process.kill()
        process.wait()


# --- on-policy: the server scores the student's own tokens ----------------------------------------

@pytest.mark.integration
def test_the_server_scores_sampled_answers_as_the_local_teacher_does(served, server):
    """EndpointScorer's rows at sampled answer positions against teacher_topk of the same model in
    PyTorch: the same top-k where the server reads the same ids (the decoded prefix re-tokenizes to
    them, which a random model's samples do not always)."""
    from edgedistill.distill.endpoint_scorer import EndpointScorer
    from edgedistill.distill.on_policy import sample_answers
    from edgedistill.distill.train import collate, teacher_topk

    model_dir, _, _ = served
    url, _ = server
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in PROMPTS]
    torch.manual_seed(0)
    answers = sample_answers(model, prompts, max_new_tokens=6, temperature=0.7, pad_id=tokenizer.eos_token_id,
                             stop_ids=[tokenizer.eos_token_id])
    examples = [(torch.tensor(p + a, dtype=torch.int32), len(p), torch.zeros((0, 0)), torch.zeros((0, 0)))
                for p, (a, _) in zip(prompts, answers)]
    batch = collate(examples, tokenizer.eos_token_id, "answer")
    scorer = EndpointScorer(EndpointConfig(url=url, retries=0), tokenizer, 32)
    ids, logprobs = scorer(batch)
    local_ids, local_logprobs = teacher_topk(model, batch, ENDPOINT_TOPK)
    assert ids.shape == local_ids.shape == (int(batch["row_mask"].sum()), ENDPOINT_TOPK)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32
    # which rows the server reads as the student's ids: the decoded prefix encodes back to them
    same_ids = []
    for row in range(len(examples)):
        sequence = batch["input_ids"][row].tolist()
        for position in torch.nonzero(batch["row_mask"][row]).flatten().tolist():
            prefix = sequence[:position + 1]
            text = tokenizer.decode(prefix, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            same_ids.append(tokenizer.encode(text, add_special_tokens=False) == prefix)
    checked = top1 = 0
    overlap, worst = 0.0, 0.0
    for row in (r for r, same in enumerate(same_ids) if same):
        theirs = {int(i): float(lp) for i, lp in zip(ids[row], logprobs[row]) if lp > -1e3}
        mine = dict(zip(local_ids[row].tolist(), local_logprobs[row].tolist()))
        checked += 1
        top1 += max(theirs, key=theirs.get) == local_ids[row, 0].item()
        overlap += len(set(theirs) & set(mine)) / ENDPOINT_TOPK
        worst = max(worst, max(abs(lp - mine[i]) for i, lp in theirs.items() if i in mine))
    print(f"\n{len(same_ids)} rows, {checked} read as the same ids: top-1 {top1 / checked:.3f}, "
          f"overlap {overlap / checked:.3f}, largest log-prob difference {worst:.4f}; {scorer.stats()}")
    assert checked >= 10 and top1 / checked >= 0.85 and overlap / checked >= 0.85 and worst < 0.1
    assert scorer.stats()["positions_scored"] == len(same_ids)


@pytest.mark.slow
def test_a_run_distills_on_policy_from_the_server_with_no_teacher_weights(served, server, tmp_path):
    """The endpoint recipe with distill.on_policy, to its on_policy stage (about 3 minutes on 2 busy
    cores, most of it the random teacher's answers and one request per scored position)."""
    _, tokenizer_only, _ = served
    url, _ = server
    recipe = endpoint_recipe(tmp_path / "r", url, tokenizer_only)
    text = recipe.read_text()
    recipe.write_text(text.replace("warmup_steps: 1}", "warmup_steps: 1, on_policy: {fraction: 1.0, "
                                   "max_new_tokens: 4, batch_size: 4}}"))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--to", "on_policy"]) == 0
    assert not list((out / "teacher").glob("*.safetensors"))
    result = json.loads((out / "on_policy" / "manifest.json").read_text())["result"]
    assert result["teacher"]["endpoint"] == f"{url}/completions"
    assert result["teacher"]["endpoint_tokenizer"] == "same ids"
    assert result["teacher"]["topk"] == 8  # the recipe's distill.topk, under the API's 20
    samples = result["samples"]
    assert samples["samples"] == result["prompts"] and samples["sampled_tokens"] > 0
    # every sampled position and the eos row after it, no more
    assert result["teacher"]["positions_scored"] >= samples["sampled_tokens"]
    assert result["teacher"]["alternatives_unmapped"] <= 0.2 * result["teacher"]["alternatives"]


@pytest.mark.integration
def test_a_server_that_cannot_score_the_students_tokens_is_named(served, tmp_path):
    from edgedistill.distill.endpoint_scorer import EndpointScorer
    from edgedistill.distill.train import collate

    model_dir, _, gguf = served
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                        tokenize=True)
    batch = collate([(torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.int32), len(ids),
                      torch.zeros((0, 0)), torch.zeros((0, 0)))], tokenizer.eos_token_id, "answer")
    port = free_port()
    process = start_llama_server(port, gguf, "--logits_all", "false")
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with pytest.raises(EdgedistillError, match="refused to score") as info:
            EndpointScorer(EndpointConfig(url=url, retries=0), tokenizer, 8)(batch)
        assert "--logits_all true" in info.value.hint and "/v1/completions" in info.value.hint
    finally:
        process.kill()
        process.wait()
    # the server gone: named, with what is kept
    with pytest.raises(EdgedistillError, match="kept failing") as info:
        EndpointScorer(EndpointConfig(url=url, retries=0), tokenizer, 8)(batch)
    assert "checkpoint" in info.value.hint
