"""Chat messages -> prompt text: the model's own template as transformers renders it, else the ChatML fallback."""
from __future__ import annotations

import json
import shutil

from sala.serve.chat import CHATML_FALLBACK, ChatTemplate
from tests.serve.live import MODEL_DIR

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sort [3, 1]."}]

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user>{{ m['content'] }}</user>\n"
            "{% elif m['role'] == 'assistant' %}<bot>{{ m['content'] }}{{ eos_token }}\n{% else %}"
            "<sys>{{ m['content'] }}</sys>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}")


def test_model_template_renders_as_transformers_does(tmp_path):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{MODEL_DIR}/{name}", tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = ChatTemplate.from_model_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.source == "model"
    for gen in (True, False):
        assert ours.render(MESSAGES, add_generation_prompt=gen) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)


def test_chatml_fallback_without_a_template(tmp_path):
    shutil.copy(f"{MODEL_DIR}/tokenizer_config.json", tmp_path / "tokenizer_config.json")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = ChatTemplate.from_model_dir(tmp_path)
    assert t.source == "chatml-fallback" and "im_start" in CHATML_FALLBACK
    assert t.render(MESSAGES[:2]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    assert t.render(MESSAGES[:2], add_generation_prompt=False).endswith("Hi<|im_end|>\n")
