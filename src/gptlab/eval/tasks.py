"""Evaluation tasks, defined as EleutherAI's lm-evaluation-harness defines them so numbers compare with published
ones: perplexity with a sliding window, LAMBADA (OpenAI's version), multiple choice (HellaSwag and a generic format)
and the zero/one/few-shot in-context classification harness of Brown et al. 2020 (GPT-3, section 2)."""

from __future__ import annotations

import importlib
import math
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..assets import cache_dir, fetch_url, sha256_of, verified
from ..data.jsonl import read_jsonl
from ..data.shards import read_shard
from ..errors import GptlabError
from ..files import atomic_write_bytes, read_input
from ..generate import Engine, Sampling
from ..model import GPT
from ..recipe import derive_seed
from ..tokenizer import Tokenizer, start_id
from .config import EvalConfig, FewshotConfig, GenerationConfig
from .scoring import loglikelihoods, perplexity_report, rolling_nll

LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
LAMBADA_SHA256 = "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"
SENTIMENT = Path(__file__).with_name("data") / "sentiment.jsonl"


def _data_info(path: Path) -> dict[str, str]:
    return {"data": str(path), "data_sha256": sha256_of(path)}


def perplexity(
    model: GPT,
    tok: Tokenizer,
    *,
    paths: Sequence[str],
    stride: int | None = None,
    batch_size: int = EvalConfig.batch_size,
    limit: int | None = None,
) -> dict[str, Any]:
    r"""Sliding-window perplexity of text files (folders: their ``*.txt``) or prepared token shards (``*.bin``
    from ``gptlab prepare``, made with the model's tokenizer), per token, per word and per byte (of the decoded
    text), defined as lm-evaluation-harness's ``loglikelihood_rolling`` tasks (``wikitext``) define them: each
    document is scored from its own start after an end-of-text token, so its first token counts too; words are
    ``len(re.split(r"\s+", text))``; bytes are its UTF-8 length. At ``stride`` = the context this is lm-eval's
    figure exactly; a smaller stride (default half the context) gives each token more left context.
    ``limit`` caps the tokens per document."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise GptlabError(f"no text files in {', '.join(paths)}")
    nll, n_tok, words, n_bytes = 0.0, 0, 0, 0
    for f in files:
        if f.suffix == ".bin":
            ids = [int(t) for t in read_shard(f)[:limit]]
            if max(ids, default=0) >= model.config.vocab_size:
                raise GptlabError(
                    f"{f} holds token ids beyond the model's vocabulary; it was prepared with another tokenizer"
                )
            text = tok.decode(ids)
        else:
            try:
                text = read_input(f).decode("utf-8")
            except UnicodeDecodeError as e:
                raise GptlabError(f"cannot read {f} as UTF-8 text ({e})") from None
            ids = tok.encode(text)[:limit] if limit else tok.encode(text)
        if limit and f.suffix != ".bin":
            text = tok.decode(ids)
        d_nll, d_tok = rolling_nll(model, [start_id(tok)] + list(ids), stride, batch_size)
        nll, n_tok = nll + d_nll, n_tok + d_tok
        words += len(re.split(r"\s+", text))
        n_bytes += len(text.encode("utf-8"))
    return {
        "task": "perplexity",
        "version": 1,
        "files": [str(f) for f in files],
        "stride": stride or model.config.block_size // 2,
        **perplexity_report(nll, n_tok, words, n_bytes),
    }


def lambada_path(path: str | None) -> Path:
    """The LAMBADA test set: ``path`` when given, else the cached copy, else downloaded (sha256-checked)."""
    if path:
        return Path(path)
    cached = cache_dir() / "lambada_test.jsonl"
    if not verified(cached, LAMBADA_SHA256):
        try:
            atomic_write_bytes(cached, fetch_url(LAMBADA_URL, LAMBADA_SHA256))
        except GptlabError as e:
            raise GptlabError(
                f"{e}. LAMBADA is not on the package index: download {LAMBADA_URL} once where the "
                f"internet is reachable and pass it with --path"
            ) from None
    return cached


# Function words that cannot end a LAMBADA passage's target (the GPT-2 paper's filter; its list is unpublished).
STOP_WORDS = (
    "a an the and or but if of to in on at by for with from as is are was were be been am it its he she "
    "they them his her their we us our you your i me my this that these those there here not no so than "
    "then too very can will would should could do does did have has had what which who whom whose when "
    "where why how all any both each few more most other some such only own same just into over under "
    "again further once about against between through during before after above below up down out off"
)


def lambada(
    model: GPT,
    tok: Tokenizer,
    *,
    path: str | None = None,
    limit: int | None = None,
    batch_size: int = EvalConfig.batch_size,
    stopword_filter: bool = False,
) -> dict[str, Any]:
    """OpenAI's LAMBADA as lm-eval's ``lambada_openai``: context = the passage up to its last space, target = " " +
    the last word; ``acc`` = every target token is the greedy choice; ``perplexity`` = exp(-mean log p(target)).
    ``stopword_filter``: the GPT-2 paper's variant, in which the first target token's greedy choice may not be a
    stop word (a word that cannot end the sentence), approximated with :data:`STOP_WORDS`."""
    p = lambada_path(path)
    docs = read_jsonl(p, ["text"], limit)
    requests = []
    for d in docs:
        ctx, _, word = d["text"].strip().rpartition(" ")
        requests.append((tok.encode(ctx), tok.encode(" " + word)))
    banned = set()
    if stopword_filter:
        for w in STOP_WORDS.split():
            for form in (w, w.capitalize()):
                ids = tok.encode(" " + form)
                if len(ids) == 1:
                    banned.add(ids[0])
    scores = loglikelihoods(model, requests, batch_size, banned)
    lls = [lp for lp, _ in scores]
    return {
        "task": "lambada_openai" + ("_stopword_filter" if stopword_filter else ""),
        "version": 1,
        **_data_info(p),
        "n": len(docs),
        "acc": sum(g for _, g in scores) / len(scores),
        "perplexity": math.exp(-sum(lls) / len(lls)),
    }


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, drop " [title]", bracketed tags, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(d: dict[str, Any]) -> tuple[str, list[str]]:
    """(context, endings) of a HellaSwag record, preprocessed as lm-eval's ``hellaswag`` task does."""
    ctx = _hellaswag_text(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
    return ctx, [_hellaswag_text(e) for e in d["endings"]]


def multiple_choice(
    model: GPT, tok: Tokenizer, *, path: str, limit: int | None = None, batch_size: int = EvalConfig.batch_size
) -> dict[str, Any]:
    """Each choice scored as a continuation (" " + choice) of the context. ``acc``: the highest log-likelihood;
    ``acc_norm``: the highest log-likelihood per character of the choice (lm-eval); ``acc_norm_tokens``: per token
    (llm.c's HellaSwag). Reads HellaSwag's jsonl (``ctx_a``, ``ctx_b``, ``activity_label``, ``endings``,
    ``label``) or ``{"context", "choices", "label"}``."""
    p = Path(path)
    first = read_jsonl(p, [], 1)[0]
    hellaswag = "endings" in first
    docs = read_jsonl(
        p,
        ["ctx_a", "ctx_b", "activity_label", "endings", "label"] if hellaswag else ["context", "choices", "label"],
        limit,
    )
    items = []
    for n, d in enumerate(docs):
        texts = [d[k] for k in ("activity_label", "ctx_a", "ctx_b")] if hellaswag else [d["context"]]
        options = d["endings" if hellaswag else "choices"]
        if not (
            all(isinstance(t, str) for t in texts)
            and isinstance(options, list)
            and len(options) >= 2
            and all(isinstance(c, str) for c in options)
            and str(d["label"]).lstrip("-").isdigit()
        ):
            raise GptlabError(
                f"{p}: record {n + 1} needs text fields, a list of 2+ string choices and an integer "
                f"label; fix or remove it"
            )
        if hellaswag:
            ctx, choices = hellaswag_doc(d)
        else:
            ctx, choices = d["context"], list(d["choices"])
        label = int(d["label"])
        if not choices or not 0 <= label < len(choices):
            raise GptlabError(f"{p}: record {n + 1} has label {label} for {len(choices)} choice(s)")
        items.append((tok.encode(ctx), [tok.encode(" " + c) for c in choices], [len(c) for c in choices], label))
    requests = [(ctx, c) for ctx, conts, _, _ in items for c in conts]
    lls = iter(lp for lp, _ in loglikelihoods(model, requests, batch_size))
    acc = acc_norm = acc_tok = 0
    for _ctx, conts, chars, label in items:
        ll = [next(lls) for _ in conts]
        acc += max(range(len(ll)), key=lambda i: ll[i]) == label
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / chars[i]) == label
        acc_tok += max(range(len(ll)), key=lambda i: ll[i] / len(conts[i])) == label
    n = len(items)
    return {
        "task": "hellaswag" if hellaswag else "multiple_choice",
        "version": 1,
        **_data_info(p),
        "n": n,
        "acc": acc / n,
        "acc_norm": acc_norm / n,
        "acc_norm_tokens": acc_tok / n,
    }


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def check_template(template: str) -> None:
    """A few-shot template names {text} and then {label}, and nothing else (``str.format`` syntax)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise GptlabError(
            f"--template {template!r} is not a valid template ({e}); use {{text}} and {{label}}"
        ) from None
    unknown = sorted(set(names) - {"text", "label"})
    if unknown or names[-1:] != ["label"] or "text" not in names:
        raise GptlabError(
            f"--template {template!r} "
            + (
                f"has unknown placeholders {unknown}"
                if unknown
                else "must hold {text} and end its placeholders with {label}"
            )
            + "; use only {text} and {label}, e.g. 'Input: {text}\\nLabel: {label}'"
        )


def fewshot_prompt(shots: Sequence[dict[str, Any]], query: str, template: str, separator: str = "\n\n") -> str:
    """The examples, filled into ``template`` ({text}, {label}), then the query with the label left out."""
    head = template.split("{label}")[0].rstrip(" ")
    return "".join(template.format(text=s["text"], label=s["label"]) + separator for s in shots) + head.format(
        text=query
    )


def fewshot(
    model: GPT,
    tok: Tokenizer,
    *,
    path: str | None = None,
    train_path: str | None = None,
    shots: Sequence[int] = tuple(FewshotConfig.default("shots")),
    template: str = FewshotConfig.template,
    seed: int = FewshotConfig.seed,
    calibrate: bool = False,
    limit: int | None = None,
    batch_size: int = EvalConfig.batch_size,
) -> dict[str, Any]:
    """In-context learning as GPT-3 measured it (Brown et al. 2020, "Language Models are Few-Shot Learners"), on
    classification. For each k, every query gets k examples drawn
    (seeded, per query) from the training pool without the query itself; each label is scored by the
    log-probability of its whole token sequence (" " + label) after the prompt, and the most likely label is the
    prediction. ``calibrate`` divides each label's probability (normalised over the labels) by the same
    probability for the content-free input "N/A" with the same examples (Zhao et al. 2021). Accuracy per k with a
    95 % Wilson interval. Defaults to the sentiment set shipped with gptlab (split into train and test).

    A prompt longer than the model's context keeps its last examples that fit (the first ones are dropped, whole,
    never cut): each k reports the shots actually used (``shots_used``: min and mean) and how many queries got
    fewer than k (``fewer_shots``); a query that does not fit even alone is cut from the left and counted in
    ``truncated``."""
    check_template(template)
    p = Path(path) if path else SENTIMENT
    docs = read_jsonl(p, ["text", "label"])
    if train_path:
        pool, test = read_jsonl(train_path, ["text", "label"]), docs
    elif path:
        pool, test = docs, docs
    else:
        pool, test = [d for d in docs if d.get("split") == "train"], [d for d in docs if d.get("split") == "test"]
    test = test[:limit] if limit else test
    labels = sorted({str(d["label"]) for d in pool + test})
    if len(labels) < 2:
        raise GptlabError(f"{p}: the data has fewer than two labels; few-shot classification needs at least two")
    label_ids = [tok.encode(" " + lab) for lab in labels]
    room = model.config.block_size - max(len(ids) for ids in label_ids)  # prompt tokens that fit before a label
    results = []
    for k in shots:
        if k > len(pool) - 1:
            raise GptlabError(f"{k} shots need at least {k + 1} training examples; the pool has {len(pool)}")
        prompts, cf_prompts, used, truncated = [], [], [], 0
        for qi, q in enumerate(test):
            rng = random.Random(derive_seed(seed, "shots", qi))
            candidates = [d for d in pool if d["text"] != q["text"]]
            examples = rng.sample(candidates, k)
            while examples and len(tok.encode(fewshot_prompt(examples, q["text"], template))) > room:
                examples = examples[1:]  # the first example, whole: the ones nearest the query stay
            prompt = fewshot_prompt(examples, q["text"], template)
            truncated += len(tok.encode(prompt)) > room
            used.append(len(examples))
            prompts.append(prompt)
            cf_prompts.append(fewshot_prompt(examples, "N/A", template))
        probs = _label_probs(model, tok, prompts, label_ids, batch_size)
        if calibrate:
            cf = _label_probs(model, tok, cf_prompts, label_ids, batch_size)
            probs = [[p_ / c for p_, c in zip(row, cfr)] for row, cfr in zip(probs, cf)]
        correct = sum(
            labels[max(range(len(labels)), key=row.__getitem__)] == str(q["label"]) for row, q in zip(probs, test)
        )
        lo, hi = wilson_interval(correct, len(test))
        results.append(
            {
                "shots": k,
                "acc": correct / len(test),
                "ci95": [lo, hi],
                "n": len(test),
                "shots_used": {"min": min(used), "mean": round(sum(used) / len(used), 3)},
                "fewer_shots": sum(u < k for u in used),
                "truncated": truncated,
            }
        )
    return {
        "task": "fewshot",
        "version": 2,  # 2: prompts that do not fit lose whole examples, reported (1 cut them silently)
        **_data_info(p),
        "labels": labels,
        "template": template,
        "seed": seed,
        "calibrated": calibrate,
        "results": results,
    }


def _label_probs(
    model: GPT, tok: Tokenizer, prompts: list[str], label_ids: list[list[int]], batch_size: int
) -> list[list[float]]:
    """Per prompt, each label's probability normalised over the labels."""
    requests = [(tok.encode(pr), ids) for pr in prompts for ids in label_ids]
    lls = [lp for lp, _ in loglikelihoods(model, requests, batch_size)]
    out = []
    for i in range(len(prompts)):
        row = lls[i * len(label_ids) : (i + 1) * len(label_ids)]
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        out.append([math.exp(v - m) / z for v in row])
    return out


def fewshot_plot(result: dict[str, Any], out: Path, title: str) -> Path:
    """Accuracy against the number of shots, with the 95 % intervals, as PNG (written atomically)."""
    from ..plotting import pyplot, save_png  # here, not at the top: matplotlib loads slowly

    plt = pyplot()
    rows = result["results"]
    k = [r["shots"] for r in rows]
    acc = [r["acc"] for r in rows]
    # max(0, ...): at acc = 0 or 1 the Wilson bound equals it up to rounding
    err = [
        [max(0.0, a - r["ci95"][0]) for a, r in zip(acc, rows)],
        [max(0.0, r["ci95"][1] - a) for a, r in zip(acc, rows)],
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(k, acc, yerr=err, fmt="o-", capsize=4)
    ax.axhline(1 / len(result["labels"]), color="gray", ls="--", label="chance")
    ax.set(xlabel="examples in the prompt (shots)", ylabel="accuracy", ylim=(0, 1), title=title, xticks=k)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, out, new=True)


# Prompted generation (Radford et al. 2019, GPT-2, section 3):
# "TL;DR:" summaries, "English: ... French:" translation, "Q: ... A:" answers.
GENERATION_TASKS: dict[str, dict[str, Any]] = {
    "summarize": {"fields": ("document", "summary"), "template": "{document}\nTL;DR:", "metric": "rouge"},
    "translate": {
        "fields": ("source", "target"),
        "template": "{source_lang}: {source}\n{target_lang}:",
        "metric": "bleu",
    },
    "qa": {"fields": ("question", "answers"), "template": "Q: {question}\nA:", "metric": "squad"},
}


def _library(module: str):
    """A metric library from the ``eval`` extra, or one clear error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptlabError(f"this metric needs {module.split('.')[0]}: pip install 'gptlab[eval]'") from None


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, token F1) against the best of the reference answers, as SQuAD v1.1's evaluation script."""
    from collections import Counter

    def f1(pred: str, gold: str) -> float:
        p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    em = max(float(squad_normalize(prediction) == squad_normalize(a)) for a in answers)
    return em, max(f1(prediction, a) for a in answers)


def generation_task(
    model: GPT,
    tok: Tokenizer,
    *,
    task: str,
    path: str,
    shots: int = GenerationConfig.shots,
    seed: int = GenerationConfig.seed,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    source_lang: str = GenerationConfig.source_lang,
    target_lang: str = GenerationConfig.target_lang,
    limit: int | None = None,
    batch_size: int = EvalConfig.batch_size,
) -> dict[str, Any]:
    """Generate greedily from the task's template (``shots`` solved examples first, drawn from the other records)
    until a newline or the end-of-text token, then score: ROUGE-1/2/L F-measure (``rouge-score``) for
    summaries, corpus BLEU and chrF (``sacrebleu``) for translation, SQuAD exact match and F1 for answers
    (``answers``: a list of acceptable strings)."""
    spec = GENERATION_TASKS[task]
    p = Path(path)
    docs = read_jsonl(p, spec["fields"])
    test = docs[:limit] if limit else docs
    out_field = spec["fields"][1]

    def fill(d: dict[str, Any], solved: bool) -> str:
        text = spec["template"].format(source_lang=source_lang, target_lang=target_lang, **d)
        if not solved:
            return text
        answer = d[out_field][0] if isinstance(d[out_field], list) else d[out_field]
        return f"{text} {answer}\n\n"

    prompts = []
    for qi, d in enumerate(test):
        pool = [x for x in docs if x is not d]
        if shots > len(pool):
            raise GptlabError(f"{shots} shots need {shots + 1} records; {p} has {len(docs)}")
        examples = random.Random(derive_seed(seed, "shots", qi)).sample(pool, shots)
        prompts.append("".join(fill(x, True) for x in examples) + fill(d, False))
    engine = Engine(model, tok)
    preds = []
    for s in range(0, len(prompts), batch_size):
        outs = engine.generate(
            prompts[s : s + batch_size], max_new_tokens, Sampling(temperature=0), stop=["\n"], sliding_window=True
        )
        preds += [(o.text or "").strip() for o in outs]
    refs = [d[out_field] for d in test]
    scores: dict[str, float] = {}
    if spec["metric"] == "rouge":
        rouge_scorer = _library("rouge_score.rouge_scorer")
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        per = [scorer.score(r, pr) for r, pr in zip(refs, preds)]
        scores = {k: sum(x[k].fmeasure for x in per) / len(per) for k in ("rouge1", "rouge2", "rougeL")}
    elif spec["metric"] == "bleu":
        sacrebleu = _library("sacrebleu")
        scores = {
            "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
            "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
        }
    else:
        pairs = [squad_scores(pr, r if isinstance(r, list) else [r]) for pr, r in zip(preds, refs)]
        scores = {"exact_match": sum(e for e, _ in pairs) / len(pairs), "f1": sum(f for _, f in pairs) / len(pairs)}
    return {
        "task": task,
        "version": 1,
        **_data_info(p),
        "n": len(test),
        "shots": shots,
        "template": spec["template"],
        **scores,
        "examples": [
            {"prompt": pr[-300:], "prediction": x, "reference": r} for pr, x, r in list(zip(prompts, preds, refs))[:3]
        ],
    }
