"""Evaluation against independent computations written here with transformers (same random weights in both
libraries), hand-worked values, and invariants (batch size changes no score)."""

import json
import math
import random
import re

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.eval import (
    fewshot,
    fewshot_prompt,
    lambada,
    loglikelihoods,
    multiple_choice,
    perplexity,
    read_jsonl,
    rolling_nll,
    wilson_interval,
)
from gptlab.generate import Engine, Sampling
from gptlab.recipe import derive_seed
from gptlab.tokenizer import GPT2Tokenizer

from .conftest import hf_pair, lm_eval_tasks, run_cli

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50257, init_std=0.1)
    return hf_pair(cfg)


def hf_logprobs(hf, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
    return logits.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logits.argmax(-1)


def test_loglikelihoods_equal_transformers_and_do_not_depend_on_batch_size(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    requests = []
    for n_ctx, n_cont in [(5, 1), (30, 4), (12, 2), (70, 3), (1, 6)]:  # 70 + 3 > 64: the context is cut
        ctx = torch.randint(0, 50257, (n_ctx,), generator=g).tolist()
        requests.append((ctx, torch.randint(0, 50257, (n_cont,), generator=g).tolist()))
    # one request whose continuation is transformers' own greedy choice
    ctx = requests[0][0]
    with torch.no_grad():
        nxt = hf(torch.tensor([ctx])).logits[0, -1].argmax().item()
    requests.append((ctx, [nxt]))
    ref = []
    for ctx, cont in requests:
        whole = (ctx + cont)[-65:]
        lp, am = hf_logprobs(hf, whole)
        n = len(cont)
        ref.append((lp[-n:].sum().item(), bool((am[-n:] == torch.tensor(cont)).all())))
    for bs in (1, 3, 8):
        got = loglikelihoods(ours, requests, bs)
        assert [g_ for _, g_ in got] == [r for _, r in ref] and got[-1][1]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in ref], rel=1e-4, abs=1e-3)


def test_rolling_perplexity_scores_each_token_once_with_its_window(pair):
    hf, ours = pair
    ids = torch.randint(0, 50257, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    block, stride = 64, 16
    # independent: the spans are tokens 1..64, then 16 at a time; a span ending at `end` is scored with the
    # window ids[max(0, end - 65):end]
    ends, e = [], min(65, len(ids))
    while True:
        ends.append(e)
        if e == len(ids):
            break
        e = min(e + stride, len(ids))
    total = 0.0
    for i in range(1, len(ids)):
        end = next(x for x in ends if x > i)
        lp, _ = hf_logprobs(hf, ids[max(0, end - block - 1) : i + 1])
        total -= lp[-1].item()
    for bs in (1, 4):
        nll, n = rolling_nll(ours, ids, stride, bs)
        assert n == 299 and nll == pytest.approx(total, rel=1e-5)
    # shorter than the context: one window, the plain mean cross-entropy
    with torch.no_grad():
        loss = hf(torch.tensor([ids[:50]]), labels=torch.tensor([ids[:50]])).loss.item()
    assert rolling_nll(ours, ids[:50])[0] == pytest.approx(loss * 49, rel=1e-5)


def test_perplexity_task_reports_per_token_word_and_byte(pair, tmp_path):
    _, ours = pair
    text = "The quick brown fox jumps over the lazy dog. " * 20 + "Ünïcödé bytes count."
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    r = perplexity(ours, GPT2Tokenizer(), paths=[str(tmp_path)], stride=32)
    ids = GPT2Tokenizer().encode(text)
    nll, n = rolling_nll(ours, [GPT2Tokenizer().eot_id] + ids, 32)  # the first token is scored too (lm-eval)
    words = len(re.split(r"\s+", text))  # lm-eval's wikitext count
    assert r["tokens"] == n == len(ids) and r["nll"] == pytest.approx(nll)
    assert r["words"] == words == len(text.split()) and r["bytes"] == len(text.encode())
    (tmp_path / "a.txt").write_text(" " + text + "\n", encoding="utf-8")  # leading/trailing space: 2 more "words"
    assert perplexity(ours, GPT2Tokenizer(), paths=[str(tmp_path)], stride=32)["words"] == words + 2
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / words))
    assert r["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2))


def test_lambada_equals_a_transformers_computation(pair, tmp_path):
    hf, ours = pair
    tok = GPT2Tokenizer()
    passages = [
        "He opened the door and saw his old friend standing there with a smile",
        "The recipe calls for two cups of flour and a pinch of salt",
        "She looked at the sky and said it would rain before noon",
    ]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in passages))
    lls, hits = [], 0
    for p in passages:
        ctx, word = p.rsplit(" ", 1)
        c, t = tok.encode(ctx), tok.encode(" " + word)
        lp, am = hf_logprobs(hf, c + t)
        lls.append(lp[-len(t) :].sum().item())
        hits += bool((am[-len(t) :] == torch.tensor(t)).all())
    for bs in (1, 2):
        r = lambada(ours, tok, path=str(tmp_path / "l.jsonl"), batch_size=bs)
        assert r["n"] == 3 and r["acc"] == hits / 3
        assert r["perplexity"] == pytest.approx(math.exp(-sum(lls) / 3), rel=1e-4)


def test_lambada_test_set_from_shared_reads_all_passages(pair, tmp_path, monkeypatch):
    from .conftest import shared_file

    path = shared_file("data/lambada_test.jsonl")
    assert len(read_jsonl(path, ["text"])) == 5153
    # a verified copy in the cache is used without any download
    from gptlab.eval.tasks import lambada_path

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "lambada_test.jsonl").write_bytes(path.read_bytes())
    monkeypatch.setenv("GPTLAB_CACHE", str(cache))
    assert lambada_path(None) == cache / "lambada_test.jsonl"
    r = lambada(pair[1], GPT2Tokenizer(), path=str(path), limit=4)
    assert r["n"] == 4 and r["data_sha256"].startswith("4aa8d02c")


def test_multiple_choice_equals_a_transformers_computation(pair, tmp_path):
    hf, ours = pair
    tok = GPT2Tokenizer()
    docs = [
        {"context": "The cat sat on the", "choices": ["mat", "quantum chromodynamics", "sofa"], "label": 0},
        {"context": "Water boils at one hundred", "choices": ["degrees", "bananas", "ways to sing"], "label": 0},
        {"context": "In the morning I drink", "choices": ["coffee with milk", "tea", "the ocean"], "label": 1},
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    acc = acc_norm = acc_tok = 0
    for d in docs:
        c = tok.encode(d["context"])
        ll, lens = [], []
        for ch in d["choices"]:
            t = tok.encode(" " + ch)
            ll.append(hf_logprobs(hf, c + t)[0][-len(t) :].sum().item())
            lens.append(len(t))
        best = lambda xs: max(range(len(xs)), key=xs.__getitem__)
        acc += best(ll) == d["label"]
        acc_norm += best([v / len(ch) for v, ch in zip(ll, d["choices"])]) == d["label"]
        acc_tok += best([v / n for v, n in zip(ll, lens)]) == d["label"]
    for bs in (1, 4):
        r = multiple_choice(ours, tok, path=str(tmp_path / "mc.jsonl"), batch_size=bs)
        assert (r["acc"], r["acc_norm"], r["acc_norm_tokens"]) == (acc / 3, acc_norm / 3, acc_tok / 3)


def test_hellaswag_format_is_preprocessed_like_lm_eval(pair, tmp_path):
    rec = {
        "ctx_a": "A man is standing in a kitchen.",
        "ctx_b": "he",
        "activity_label": "Cooking",
        "endings": ["picks up a knife [title] and cuts.", "flies away.", "eats the sink.", "sings."],
        "label": 0,
    }
    (tmp_path / "h.jsonl").write_text(json.dumps(rec))
    r = multiple_choice(pair[1], GPT2Tokenizer(), path=str(tmp_path / "h.jsonl"))
    assert r["task"] == "hellaswag" and r["n"] == 1
    # the strings themselves, against lm-eval's own HellaSwag preprocessing
    datasets = pytest.importorskip("datasets", reason="lm-eval's hellaswag utils need datasets")
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    from gptlab.eval.tasks import hellaswag_doc

    tricky = [
        rec,
        {
            "ctx_a": "  [header] How to fix a bike.  ",
            "ctx_b": "first [step] you",
            "activity_label": "Bikes",
            "endings": [" remove the wheel [title] Then.", "[substeps] Pump  it.", "x", "y"],
            "label": 1,
        },
    ]
    for doc, ref in zip(tricky, utils.process_docs(datasets.Dataset.from_list(tricky))):
        assert hellaswag_doc(doc) == (ref["query"], ref["choices"])


def test_fewshot_prompts_exclude_the_query_and_score_whole_labels(pair, tmp_path):
    hf, ours = pair
    tok = GPT2Tokenizer()
    assert (
        fewshot_prompt([{"text": "good", "label": "positive"}], "bad", "Input: {text}\nLabel: {label}")
        == "Input: good\nLabel: positive\n\nInput: bad\nLabel:"
    )
    rows = [{"text": f"example {i}", "label": lab} for i, lab in enumerate(["yes", "no", "maybe so"] * 3)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = fewshot(ours, tok, path=str(tmp_path / "d.jsonl"), shots=[0, 8])
    assert r["labels"] == ["maybe so", "no", "yes"] and [x["shots"] for x in r["results"]] == [0, 8]
    # zero-shot, by hand with transformers: the label whose full token sequence is most likely after the prompt
    correct = 0
    for row in rows:
        prompt = tok.encode(f"Input: {row['text']}\nLabel:")
        scores = {}
        for lab in r["labels"]:
            t = tok.encode(" " + lab)
            scores[lab] = hf_logprobs(hf, prompt + t)[0][-len(t) :].sum().item()
        correct += max(scores, key=scores.get) == row["label"]
    assert r["results"][0]["acc"] == correct / len(rows)
    with pytest.raises(GptlabError, match="9 shots need at least 10 training examples"):
        fewshot(ours, tok, path=str(tmp_path / "d.jsonl"), shots=[9])


def test_fewshot_prompts_longer_than_the_context_keep_whole_examples_and_say_so(tmp_path):
    """A 64-token context cannot hold 5 examples of ~20 tokens: each prompt keeps the examples nearest the query
    that fit (whole), the result reports the shots actually used, and the scores equal those of the prompts built
    with exactly those examples."""
    from .conftest import gpt2_shaped

    model, tok = gpt2_shaped(block_size=64), GPT2Tokenizer()
    rows = [{"text": f"a rather long sentence number {i} about the weather today", "label": lab}
            for i, lab in enumerate(["yes", "no"] * 6)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = fewshot(model, tok, path=str(tmp_path / "d.jsonl"), shots=[0, 5], limit=4)
    zero, five = r["results"]
    assert zero["fewer_shots"] == 0 and zero["shots_used"] == {"min": 0, "mean": 0.0}
    assert five["fewer_shots"] == 4 and 0 < five["shots_used"]["mean"] < 5 and five["truncated"] == 0
    template, expected = "Input: {text}\nLabel: {label}", []
    for qi, q in enumerate(rows[:4]):  # by hand: the most of its 5 examples, nearest the query first, that fit
        examples = random.Random(derive_seed(1337, "shots", qi)).sample([x for x in rows if x["text"] != q["text"]], 5)
        room = 64 - 1  # both labels are one token
        expected.append(
            max(n for n in range(6) if len(tok.encode(fewshot_prompt(examples[5 - n :], q["text"], template))) <= room)
        )
    assert five["shots_used"] == {"min": min(expected), "mean": sum(expected) / 4} and max(expected) < 5
    r2 = run_cli("eval", "fewshot", "--help")
    assert "--threads" in r2.stdout  # one vocabulary with train, align and distill


def test_wilson_interval_textbook_value():
    lo, hi = wilson_interval(8, 10)  # 8/10 at 95 %: (0.490, 0.943)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": "fine"}\nnot json\n')
    with pytest.raises(GptlabError, match=r"b.jsonl line 3 is not valid JSON"):
        read_jsonl(tmp_path / "b.jsonl", ["text"])
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(GptlabError, match=r"c.jsonl line 2: missing field\(s\) \['text'\]"):
        read_jsonl(tmp_path / "c.jsonl", ["text"])
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(GptlabError, match="holds no records"):
        read_jsonl(tmp_path / "e.jsonl", ["text"])


def test_eval_cli_fewshot_on_the_shipped_set_with_plot(tmp_path):
    from gptlab.interop.hf import save_hf

    from .conftest import gpt2_shaped

    model = gpt2_shaped()
    save_hf(model.state_dict(), model.config, {"kind": "gpt2"}, tmp_path / "hf")
    r = run_cli(
        "eval",
        "fewshot",
        str(tmp_path / "hf"),
        "--shots",
        "0,2",
        "--limit",
        "6",
        "--plot",
        str(tmp_path / "fs.png"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["labels"] == ["negative", "positive"] and [x["n"] for x in out["results"]] == [6, 6]
    assert (tmp_path / "fs.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("eval", "mc", str(tmp_path / "hf"), str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stderr.startswith("gptlab: error: cannot read") and r.stderr.count("\n") == 1


def test_squad_exact_match_and_f1_hand_computed():
    from gptlab.eval.tasks import squad_scores

    assert squad_scores("The Eiffel Tower!", ["Eiffel Tower", "tower"]) == (1.0, 1.0)
    em, f1 = squad_scores("in Paris France", ["Paris"])  # precision 1/3, recall 1 -> F1 0.5
    assert em == 0.0 and f1 == pytest.approx(0.5)
    assert squad_scores("a cat", ["dog"]) == (0.0, 0.0)


@pytest.mark.parametrize("kind", ["summarize", "translate", "qa"])
def test_generation_tasks_equal_transformers_generate_scored_by_the_libraries(pair, tmp_path, kind):
    import sacrebleu
    from rouge_score import rouge_scorer

    from gptlab.eval.tasks import GENERATION_TASKS, generation_task, squad_scores

    hf, ours = pair
    tok = GPT2Tokenizer()
    rows = {
        "summarize": [
            {"document": "The council met on Monday and approved the new park.", "summary": "Park ok."},
            {"document": "Rain is expected all week across the north.", "summary": "Wet week."},
        ],
        "translate": [{"source": "the cat", "target": "le chat"}, {"source": "good day", "target": "bonjour"}],
        "qa": [
            {"question": "What is the capital of France?", "answers": ["Paris"]},
            {"question": "How many legs has a spider?", "answers": ["eight", "8"]},
        ],
    }[kind]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = generation_task(ours, tok, task=kind, path=str(tmp_path / "d.jsonl"), max_new_tokens=12, batch_size=2)
    preds = []
    for row in rows:
        prompt = GENERATION_TASKS[kind]["template"].format(source_lang="English", target_lang="French", **row)
        ids = tok.encode(prompt)
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tok.eot_id,
            pad_token_id=tok.eot_id,
        )
        text = tok.decode([t for t in out[0, len(ids) :].tolist() if t != tok.eot_id])
        preds.append(text.split("\n")[0].strip())
    assert [e["prediction"] for e in r["examples"]] == preds
    if kind == "summarize":
        s = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        assert r["rougeL"] == pytest.approx(
            sum(s.score(x["summary"], p)["rougeL"].fmeasure for x, p in zip(rows, preds)) / 2
        )
    elif kind == "translate":
        assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [[x["target"] for x in rows]]).score)
    else:
        assert r["f1"] == pytest.approx(sum(squad_scores(p, x["answers"])[1] for x, p in zip(rows, preds)) / 2)


@pytest.mark.slow
def test_lm_eval_harness_runs_local_tasks_on_a_gptlab_model(pair, tmp_path, monkeypatch):
    """lm-eval's own evaluator, offline, on tasks defined here: its multiple-choice acc/acc_norm equal gptlab's,
    its rolling log-likelihood equals gptlab's, and generate_until goes through the engine."""
    lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is part of the dev install")

    from gptlab.checkpoint import save_model_checkpoint
    from gptlab.eval.lm_eval_adapter import GptlabLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _, ours = pair
    save_model_checkpoint(tmp_path / "checkpoint_dir", ours.state_dict(), ours.config, {"kind": "gpt2"})
    mc = [
        {"context": "The cat sat on the", "choices": ["mat", "quantum chromodynamics", "sofa"], "label": 0},
        {"context": "In the morning I drink", "choices": ["coffee with milk", "tea", "the ocean"], "label": 1},
        {"context": "Water boils at one hundred", "choices": ["degrees", "bananas"], "label": 0},
    ]
    texts = [{"text": "A short document about the weather in spring. " * 12}, {"text": "Another one, shorter."}]
    # generate_until: the first answer is what the engine generates greedily (cut at the newline), the second
    # is not; lm-eval's exact match through the adapter must then be exactly 1/2
    engine_answer = (
        Engine(ours, GPT2Tokenizer())
        .generate(["Q: What is two plus two?\nA:"], 8, Sampling(temperature=0), stop=["\n"])[0]
        .text
    )
    qa = [
        {"question": "What is two plus two?", "answer": engine_answer},
        {"question": "What is two plus two?", "answer": engine_answer + " not this"},
    ]
    tasks = lm_eval_tasks(tmp_path, mc=mc, ppl=texts, qa=qa)
    lm = GptlabLM(str(tmp_path / "checkpoint_dir"), batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["gl_mc", "gl_ppl", "gl_qa"], task_manager=tasks)
    res = out["results"]
    ours_mc = multiple_choice(ours, GPT2Tokenizer(), path=str(tmp_path / "mc.jsonl"))
    assert res["gl_mc"]["acc,none"] == pytest.approx(ours_mc["acc"])
    assert res["gl_mc"]["acc_norm,none"] == pytest.approx(ours_mc["acc_norm"])
    tok = GPT2Tokenizer()
    nll = sum(rolling_nll(ours, [tok.eot_id] + tok.encode(t["text"]), 64)[0] for t in texts)
    n_bytes = sum(len(t["text"].encode()) for t in texts)
    assert res["gl_ppl"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    # `gptlab eval perplexity` at stride = context is lm-eval's rolling task, word and byte counts included
    for i, t in enumerate(texts):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(t["text"])
    ppl = perplexity(ours, tok, paths=[str(tmp_path / "docs")], stride=64)
    assert ppl["word_perplexity"] == pytest.approx(res["gl_ppl"]["word_perplexity,none"], rel=1e-5)
    assert ppl["bits_per_byte"] == pytest.approx(res["gl_ppl"]["bits_per_byte,none"], rel=1e-5)
    assert res["gl_qa"]["exact_match,none"] == pytest.approx(0.5)


def test_stopword_filter_changes_only_the_first_greedy_choice(pair, tmp_path):
    hf, ours = pair
    ctx = torch.randint(0, 50257, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        top2 = hf(torch.tensor([ctx])).logits[0, -1].topk(2).indices.tolist()
    assert loglikelihoods(ours, [(ctx, [top2[1]])])[0][1] is False
    assert loglikelihoods(ours, [(ctx, [top2[1]])], not_first={top2[0]})[0][1] is True
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": "It was cold so she closed the window"}))
    r = lambada(ours, GPT2Tokenizer(), path=str(tmp_path / "l.jsonl"), stopword_filter=True)
    assert r["task"] == "lambada_openai_stopword_filter" and r["n"] == 1


def test_perplexity_of_a_prepared_shard_equals_that_of_its_tokens(pair, tmp_path):
    from gptlab.data.shards import write_shard

    _, ours = pair
    ids = torch.randint(0, 50257, (200,), generator=torch.Generator().manual_seed(6)).numpy().astype("uint16")
    write_shard(tmp_path / "val_000.bin", ids)
    r = perplexity(ours, GPT2Tokenizer(), paths=[str(tmp_path / "val_000.bin")], stride=32)
    eot = GPT2Tokenizer().eot_id
    assert r["tokens"] == 200 and r["nll"] == pytest.approx(rolling_nll(ours, [eot] + ids.tolist(), 32)[0])
