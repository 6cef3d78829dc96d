"""Structured output (gptlab.generate.constraint, applied by gptlab.serve.scheduler), tested as vLLM tests its own:
a random-weight model with GPT-2's tokenizer (the worst case: left alone it writes anything) samples at temperature 1
with several seeds and ``n`` > 1, all requests in one busy batch, and every output validates against its schema with
the ``jsonschema`` package, every regex output matches with ``re.fullmatch``, every choice is one of the choices.
Constrained and free rows batched together give each row what it gets alone. What cannot be enforced is refused
(400 through the server, with the parameter named), and an output cut by max_tokens says ``length``."""

import asyncio
import json
import re

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.generate import Sampling
from gptlab.generate.constraint import compile_constraint
from gptlab.loader import load_model
from gptlab.serve.scheduler import Request, Scheduler

from .conftest import Served, random_gpt2_checkpoint

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

HOT = Sampling(temperature=1.0)
GREEDY = Sampling(temperature=0)
SCHEMAS = [
    {  # an object: enum, bounded integer, bounded string, required fields
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "name": {"type": "string", "maxLength": 8},
        },
        "required": ["colour", "age", "name"],
        "additionalProperties": False,
    },
    {  # nested arrays of bounded numbers (multiples of 1/4: a number cannot run on forever)
        "type": "array",
        "items": {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5, "multipleOf": 0.25},
                  "maxItems": 3},
        "minItems": 1,
        "maxItems": 3,
    },
    {  # anyOf, booleans and null, an optional field
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "value": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]},
            "tag": {"type": "string", "pattern": "^[a-z]{2,4}$"},
        },
        "required": ["ok", "value"],
        "additionalProperties": False,
    },
    {  # a $ref to a definition, and an exclusive bound
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "exclusiveMinimum": 0,
                                                                    "maximum": 99}},
                            "required": ["x"], "additionalProperties": False}},
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
]  # fmt: skip
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6} [0-9]{1,2}"]
GBNF = 'root ::= "(" num " " op " " num ")"\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
GBNF_AS_REGEX = r"\([1-9][0-9]? [+\-*] [1-9][0-9]?\)"
LARK = 'start: "<" WORD ("," WORD)* ">"\nWORD: /[a-z]{1,5}/'
LARK_AS_REGEX = r"<[a-z]{1,5}(,[a-z]{1,5})*>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_gpt2_checkpoint(tmp_path_factory.mktemp("structured") / "tiny-gpt2", 256)


@pytest.fixture(scope="module")
def lm(ckpt):
    return load_model(ckpt, "cpu")


def grammar(lm, kind, spec):
    return compile_constraint(kind, spec, lm.tokenizer, lm.model.config.vocab_size)


def texts(lm, reqs, max_batch=16):
    """Every request submitted at once into one scheduler: [request][choice] -> (text, finish_reason)."""
    sched = Scheduler(lm.model, lm.tokenizer, max_batch=max_batch)

    async def one(r):
        out: dict[int, list] = {}
        async for c in sched.submit(r):
            got = out.setdefault(c.index, ["", None])
            got[0] += c.text
            got[1] = c.finish_reason or got[1]
        return [tuple(out[i]) for i in sorted(out)]

    async def everyone():
        return await asyncio.gather(*(one(r) for r in reqs))

    try:
        return asyncio.run(everyone())
    finally:
        sched.close()


def prompt(lm, text="Answer:"):
    return lm.tokenizer.encode(text)


def test_every_output_validates_against_its_schema(lm):
    reqs = [
        Request(prompt(lm), 120, HOT, seed=seed, n=2, grammar=grammar(lm, "json_schema", schema))
        for schema in SCHEMAS
        for seed in range(3)
    ]
    reqs.append(Request(prompt(lm), 120, HOT, seed=9, n=3, grammar=grammar(lm, "json_object", None)))
    reqs.append(Request(prompt(lm), 40, HOT, seed=1, n=2))  # a free row in the same batch
    results = texts(lm, reqs)
    for r, choices in zip(reqs[: 3 * len(SCHEMAS)], results):
        schema = SCHEMAS[reqs.index(r) // 3]
        for text, finish in choices:
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), schema)
    for text, finish in results[-2]:  # any object: a random model may nest it past max_tokens
        assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))


def test_regex_choice_and_grammar_outputs_match(lm):
    cases = [("regex", rx, rx) for rx in REGEXES]
    cases += [("choice", ["alpha", "beta gamma", "δ delta"], None), ("grammar", GBNF, GBNF_AS_REGEX)]
    cases += [("grammar", LARK, LARK_AS_REGEX)]
    reqs = [
        Request(prompt(lm), 60, HOT, seed=s, n=2, grammar=grammar(lm, k, spec)) for k, spec, _ in cases for s in (0, 1)
    ]
    for (kind, spec, rx), choices in zip([c for c in cases for _ in (0, 1)], texts(lm, reqs)):
        for text, finish in choices:
            assert finish == "stop"
            assert text in spec if kind == "choice" else re.fullmatch(rx, text), (kind, text)


@pytest.mark.parametrize("sampling", [GREEDY, HOT], ids=["greedy", "seeded"])
def test_constrained_and_free_rows_batched_together_give_what_each_gives_alone(lm, sampling):
    reqs = [
        Request(prompt(lm, "Hi"), 40, sampling, seed=3, grammar=grammar(lm, "json_schema", SCHEMAS[0])),
        Request(prompt(lm, "Once upon a time"), 30, sampling, seed=4),
        Request(prompt(lm, "Phone:"), 30, sampling, seed=5, n=2, grammar=grammar(lm, "regex", REGEXES[0])),
        Request(prompt(lm, "x"), 30, sampling, seed=6),
    ]
    alone = [texts(lm, [r], max_batch=2)[0] for r in reqs]
    assert texts(lm, reqs) == alone


def test_the_mask_allows_exactly_what_the_grammar_allows(lm):
    """Every token allowed at the start of a choice grammar begins one of the choices, and each choice's own
    tokens are allowed throughout (an independent check of the mask against the tokenizer)."""
    from gptlab.generate.constraint import Matcher

    tok = lm.tokenizer
    choices = ["yes", "no", "maybe not"]
    g = grammar(lm, "choice", choices)
    first = Matcher(g, tok, lm.model.config.vocab_size).allowed()
    allowed = [tok.decode([t]) for t in torch.nonzero(first).flatten().tolist()]
    assert allowed and all(any(c.startswith(a) for c in choices) for a in allowed)
    for c in choices:
        m = Matcher(g, tok, lm.model.config.vocab_size)
        for t in tok.encode(c):
            assert m.allowed()[t]
            m.advance(t)
        assert m.complete and m.allowed()[tok.eot_id]


@pytest.mark.parametrize(
    "kind,spec,why",
    [
        ("json_schema", {"type": "array", "uniqueItems": True}, "uniqueItems"),
        ("json_schema", {"not": {"type": "string"}}, "not"),
        ("json_schema", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
        ("json_schema", {"type": "array", "contains": {"type": "integer"}}, "contains"),
        ("json_schema", {"type": "strin"}, "strin"),
        ("json_schema", [1, 2], "must be an object"),
        ("regex", "[0-9", "unclosed"),
        ("grammar", 'root ::= "a" (', "Expected ')'"),
        ("grammar", "start: undefined_rule", "undefined_rule"),
        ("choice", [], "non-empty"),
    ],
)
def test_what_cannot_be_enforced_is_refused(lm, kind, spec, why):
    with pytest.raises(GptlabError, match=re.escape(why)):
        grammar(lm, kind, spec)


def test_max_tokens_before_the_end_says_length(lm):
    (choices,) = texts(lm, [Request(prompt(lm), 5, HOT, seed=0, grammar=grammar(lm, "json_schema", SCHEMAS[0]))])
    text, finish = choices[0]
    assert finish == "length" and text.startswith('{"colour": ')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.fixture(scope="module")
def client(ckpt):
    pytest.importorskip("openai")
    server = Served(ckpt, "--served-model-name", "tiny")
    yield server.client()
    server.stop()


def test_the_openai_client_gets_schema_regex_and_choice_outputs(client):
    schema = SCHEMAS[0]
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a person."}],
        max_tokens=80,
        temperature=1.0,
        seed=1,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)
    r = client.completions.create(
        model="tiny", prompt="Call me at", max_tokens=20, temperature=1.0, seed=2,
        extra_body={"structured_outputs": {"regex": REGEXES[0]}},
    )  # fmt: skip
    assert re.fullmatch(REGEXES[0], r.choices[0].text)
    stream = client.completions.create(
        model="tiny", prompt="Pick:", max_tokens=20, stream=True,
        extra_body={"structured_outputs": {"choice": ["left", "right"]}},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("left", "right")
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=60, temperature=1.0, seed=3,
        response_format={"type": "json_object"},
    )  # fmt: skip
    c = r.choices[0]  # any object: a random model may nest it past max_tokens
    assert c.message.content.startswith("{") and (c.finish_reason == "length" or json.loads(c.message.content))


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= undefined"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"]}, "stop": ["x"]}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "structured_outputs"),
    ],
)  # fmt: skip
def test_the_server_refuses_what_it_cannot_enforce(client, extra, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body=extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
