"""Tool calls (gptlab.serve.tools) through the official ``openai`` client: a Hermes-format chat template (the format
Qwen2.5 and Hermes models use) renders the tools exactly as ``transformers``' ``apply_chat_template`` does; forced
calls (``required``, a named function) always give arguments that parse and validate against the function's schema,
even from a random-weight model, streamed or not; the streaming parser gives what the whole-text parser gives, at
every split of the text; and what cannot work is a 400 naming the parameter."""

import json
from pathlib import Path

import pytest

from gptlab.chat import ChatTemplate
from gptlab.serve.protocol import Message
from gptlab.serve.tools import CallStream, split_calls

from .conftest import Served, random_gpt2_checkpoint

TEMPLATE = Path(__file__).parent / "data" / "hermes_tools.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "integer",
                                                                                       "minimum": 0, "maximum": 9}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TOOLS = [WEATHER, ADD]
CONVERSATION = [
    {"role": "system", "content": "Be brief & exact <always>."},
    {"role": "user", "content": "Weather in Paris? And 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "c"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
    {"role": "user", "content": "Thanks. Tokyo too?"},
]  # fmt: skip


def test_the_template_renders_tools_and_calls_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    from gptlab.tokenizer import BPETokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=BPETokenizer.train(["hello world"] * 5, 300).tok)
    text = TEMPLATE.read_text()
    # Hugging Face's convention for a call in the history: arguments as an object (OpenAI sends their JSON text)
    hf = [
        {
            **m,
            "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ],
        }
        if m.get("tool_calls")
        else m
        for m in CONVERSATION
    ]
    want = tok.apply_chat_template(hf, tools=TOOLS, chat_template=text, tokenize=False, add_generation_prompt=True)
    messages = [Message(**m).for_template() for m in CONVERSATION]
    got = ChatTemplate(TEMPLATE).render(messages, tools=TOOLS)
    assert got == want
    assert '"a": 2' in got and "<tool_response>\n5\n</tool_response>" in got and "& exact <always>" in got
    assert ChatTemplate(TEMPLATE).renders_tools and not ChatTemplate().renders_tools


SAMPLES = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": "add", '
    '"arguments": {"a": 3, "b": 4}}\n</tool_call>',
    "no call here, just text with a < and a <tool",
    '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call> a block that is not a call stays text',
    'unclosed <tool_call>\n{"name": "add"',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_the_streaming_parser_gives_what_the_whole_text_parser_gives_at_every_split(text):
    content, calls = split_calls(text)
    strip = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            s = CallStream()
            items = [it for p in pieces for it in s.feed(p)] + s.close()
            streamed = "".join(v for k, v in items if k == "content")
            got = [(v["function"]["name"], json.loads(v["function"]["arguments"])) for k, v in items if k == "call"]
            assert got == strip and streamed.strip() == (content or "").strip()
    if calls:
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    ckpt = random_gpt2_checkpoint(tmp_path_factory.mktemp("tools") / "tiny-gpt2", 512)
    with_tools = Served(ckpt, "--served-model-name", "tiny", "--chat-template", str(TEMPLATE))
    plain = Served(ckpt, "--served-model-name", "tiny")
    yield with_tools, plain
    with_tools.stop()
    plain.stop()


def _check(call, names):
    jsonschema = pytest.importorskip("jsonschema")
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    assert call.function.name in names and call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


NAMED = {"type": "function", "function": {"name": "add"}}


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_call_always_parses_and_validates(served, choice):
    client = served[0].client()
    names = ["get_weather", "add"] if choice == "required" else ["add"]
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=CONVERSATION[:2], tools=TOOLS, tool_choice=choice,
                                           max_tokens=80, temperature=1.0, seed=seed, n=2)  # fmt: skip
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
            _check(c.message.tool_calls[0], names)
        streamed = client.chat.completions.create(model="tiny", messages=CONVERSATION[:2], tools=TOOLS,
                                                  tool_choice=choice, max_tokens=80, temperature=1.0, seed=seed, n=2,
                                                  stream=True)  # fmt: skip
        calls: dict[int, list] = {}
        finish = {}
        for chunk in streamed:
            for ch in chunk.choices:
                calls.setdefault(ch.index, []).extend(ch.delta.tool_calls or [])
                finish[ch.index] = ch.finish_reason or finish.get(ch.index)
        for k, c in enumerate(r.choices):  # the same seed: the same call as without streaming
            (d,) = calls[k]
            assert finish[k] == "tool_calls"
            assert (d.function.name, d.function.arguments) == (c.message.tool_calls[0].function.name,
                                                               c.message.tool_calls[0].function.arguments)  # fmt: skip


def test_auto_none_and_a_conversation_with_earlier_calls(served):
    client = served[0].client()
    auto = client.chat.completions.create(model="tiny", messages=CONVERSATION, tools=TOOLS, max_tokens=20, seed=0)
    none = client.chat.completions.create(model="tiny", messages=CONVERSATION, tools=TOOLS, tool_choice="none",
                                          max_tokens=20, seed=0)  # fmt: skip
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens  # "none": the tools are not in the prompt


@pytest.mark.parametrize(
    "which,kw,param",
    [
        (0, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (0, {"tool_choice": "required"}, "tool_choice"),
        (0, {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        (1, {"tools": TOOLS}, "tools"),  # gptlab's own template does not render tools
    ],
)  # fmt: skip
def test_what_cannot_work_is_a_400(served, which, kw, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        served[which].client().chat.completions.create(model="tiny", messages=CONVERSATION[:2], max_tokens=5, **kw)
    assert e.value.body["param"] == param, e.value.body
