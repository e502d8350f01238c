"""Chat messages -> prompt text through the model's chat template.

The template is the `chat_template` of the model folder's tokenizer_config.json (or chat_template.jinja), rendered
the way transformers' `apply_chat_template` renders it (jinja2 sandbox, `bos_token` / `eos_token` in scope).
A model without one gets `CHATML_FALLBACK`, the one fallback of this package (documented in docs/serving.md).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# ChatML: <|im_start|>role\ncontent<|im_end|>\n per message, then the assistant's header.
CHATML_FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_text(value) -> str:
    if isinstance(value, dict):                  # AddedToken serialised as a dict
        return value.get("content", "")
    return value or ""


def read_chat_template(model_dir: str | Path | None) -> tuple[str | None, dict]:
    """(template or None, special tokens {bos_token, eos_token}) from a model folder."""
    if model_dir is None:
        return None, {}
    folder = Path(model_dir)
    template, specials = None, {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):           # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        specials = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token")}
    jinja_path = folder / "chat_template.jinja"
    if template is None and jinja_path.is_file():
        template = jinja_path.read_text()
    return template, specials


class ChatTemplate:
    """Renders messages [{"role", "content"}] into the prompt text; `source` says which template is used."""

    def __init__(self, template: str | None = None, special_tokens: dict | None = None) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = "model" if template else "chatml-fallback"
        if not template:
            logger.warning("the model's tokenizer has no chat template: using the ChatML fallback")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(template or CHATML_FALLBACK)
        self._specials = dict(special_tokens or {})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> ChatTemplate:
        template, specials = read_chat_template(model_dir)
        return cls(template, specials)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text; a template error (e.g. roles it rejects) is a ValueError with the template's message."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._specials)
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from None
