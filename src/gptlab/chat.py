"""Chat templates: messages to the prompt text a model was fine-tuned on.

The default is the template ``gptlab align sft`` trains with (:func:`chat_prompt`): each message
as ``"<Role>: <content>\\n"``, then ``"Assistant: "``. A model tuned that way ends its turn with the end-of-text
token, or starts the next turn itself, so generation also stops before a new ``"\\nUser:"`` or ``"\\nSystem:"``.

``--chat-template FILE`` reads a Jinja template in Hugging Face's convention (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``; transformers' "Chat templates" guide), rendered in Jinja's immutable sandbox, as
transformers renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import GptlabError
from .tokenizer import EOT_TEXT

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The text of ``messages`` in the chat template, ending with ``"Assistant: "`` for generation."""
    return "".join(f"{ROLES[m['role']]}: {m['content']}\n" for m in messages) + f"{ROLES['assistant']}: "


class ChatTemplate:
    def __init__(self, path: str | Path | None = None) -> None:
        self.source = None if path is None else Path(path)
        self._jinja = None
        self.stop: list[str] = [f"\n{ROLES['user']}:", f"\n{ROLES['system']}:"] if path is None else []
        if path is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            try:
                text = Path(path).read_text(encoding="utf-8")
                self._jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)
            except (OSError, UnicodeDecodeError) as e:
                raise GptlabError(f"cannot read --chat-template {path}: {getattr(e, 'strerror', None) or e}") from None
            except TemplateError as e:
                raise GptlabError(f"--chat-template {path} is not a valid Jinja template: {e}") from None

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self._jinja is None:
            return chat_prompt(messages)
        from jinja2 import TemplateError

        try:
            return self._jinja.render(
                messages=list(messages), add_generation_prompt=True, bos_token=EOT_TEXT, eos_token=EOT_TEXT
            )
        except TemplateError as e:
            raise GptlabError(f"the chat template {self.source} failed on these messages: {e}") from None
