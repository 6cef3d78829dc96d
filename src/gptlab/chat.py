"""Chat templates: messages to the prompt text a model was fine-tuned on.

The default is the template ``gptlab align sft`` trains with (:func:`chat_prompt`): each message
as ``"<Role>: <content>\\n"``, then ``"Assistant: "``. A model tuned that way ends its turn with the end-of-text
token, or starts the next turn itself, so generation also stops before a new ``"\\nUser:"`` or ``"\\nSystem:"``.

``--chat-template FILE`` reads a Jinja template in Hugging Face's convention (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``; transformers' "Chat templates" guide), rendered in Jinja's immutable sandbox, as
transformers renders them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import GptlabError
from .files import read_input
from .tokenizer import EOT_TEXT

ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The text of ``messages`` in the chat template, ending with ``"Assistant: "`` for generation."""
    return "".join(f"{ROLES[m['role']]}: {m['content']}\n" for m in messages) + f"{ROLES['assistant']}: "


def _environment() -> Any:
    """Jinja as ``transformers`` renders chat templates: an immutable sandbox, trim_blocks and lstrip_blocks, the
    loop controls extension, the ``raise_exception`` and ``strftime_now`` globals templates call, and its ``tojson``
    (plain ``json.dumps``: Jinja's own sorts keys and escapes ``<``, ``>``, ``&`` and ``'`` for HTML)."""
    from jinja2 import TemplateError, ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    env.filters["tojson"] = tojson
    return env


class ChatTemplate:
    """Messages to a prompt: gptlab's own template (none given), a ``--chat-template`` file, or a model's own
    template ``text`` (its ``tokenizer_config.json``), rendered with the model's ``bos_token`` and ``eos_token``."""

    def __init__(
        self,
        path: str | Path | None = None,
        text: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        from jinja2 import TemplateError

        self.source = str(path) if path is not None else "of the model" if text is not None else None
        self.tokens = {"bos_token": bos_token or EOT_TEXT, "eos_token": eos_token or EOT_TEXT}
        self._jinja = None
        self.stop: list[str] = [f"\n{ROLES['user']}:", f"\n{ROLES['system']}:"] if self.source is None else []
        if path is not None:
            try:
                text = read_input(path, "--chat-template").decode("utf-8")
            except UnicodeDecodeError as e:
                raise GptlabError(f"cannot read --chat-template {path}: {getattr(e, 'strerror', None) or e}") from None
        self.text = text  # the Jinja source (None: gptlab's own template, which is code)
        if text is not None:
            try:
                self._jinja = _environment().from_string(text)
            except TemplateError as e:
                raise GptlabError(f"the chat template {self.source} is not a valid Jinja template: {e}") from None

    @classmethod
    def of(cls, tokenizer: Any, path: str | Path | None = None) -> ChatTemplate:
        """The template a server uses: ``path`` when given, else the tokenizer's own, else gptlab's."""
        if path is None and getattr(tokenizer, "chat_template", None):
            return cls(None, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
        return cls(path)

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads a ``tools`` variable (Hugging Face's convention for tool definitions)."""
        return self.text is not None and re.search(r"\btools\b", self.text) is not None

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt for ``messages`` (and ``tools``, OpenAI's tool definitions, for a template that reads them)."""
        if self._jinja is None:
            return chat_prompt(messages)
        from jinja2 import TemplateError

        extra = {"tools": tools} if tools else {}
        try:
            return self._jinja.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.tokens, **extra
            )
        except TemplateError as e:
            raise GptlabError(f"the chat template {self.source} failed on these messages: {e}") from None
