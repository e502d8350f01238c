"""Tokenizers: the shipped byte-level BPE for small models, training a new one, and loading one from a model folder.

`TextTokenizer` is the one interface the data pipeline and the evaluation use, whatever the backend
(a `tokenizers.Tokenizer` or a transformers tokenizer).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)


def shipped_tokenizer_path() -> Path:
    """Path of the BPE tokenizer shipped with sala (`sala/assets/tokenizer/tokenizer.json`)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "tokenizer.json"


class TextTokenizer:
    """Text <-> token ids with known BOS / EOS / PAD ids.

    Wraps either a `tokenizers.Tokenizer` (`backend="tokenizers"`) or a transformers tokenizer
    (`backend="transformers"`). `source` records where it was loaded from.
    """

    def __init__(self, tok: Any, backend: str, source: str = ""):
        self.tok = tok
        self.backend = backend
        self.source = source
        if backend == "tokenizers":
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
            self.bos_id = tok.token_to_id(BOS_TOKEN)
            self.eos_id = tok.token_to_id(EOS_TOKEN)
            self.pad_id = tok.token_to_id(PAD_TOKEN)
        else:
            self.vocab_size = len(tok)
            self.bos_id = tok.bos_token_id
            eos = tok.eos_token_id
            self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.add_bos = self._default_add_bos()
        self.chat_template: str | None = getattr(tok, "chat_template", None) if backend != "tokenizers" else None

    def _default_add_bos(self) -> bool:
        """Whether a prompt starts with BOS by default: the tokenizer's own setting, as transformers applies it
        (`tok("text")` with special tokens), so the CLI and `AutoTokenizer` give the model the same ids."""
        if self.bos_id is None:
            return False
        if self.backend == "tokenizers":
            return True   # sala's BPE: tokenizer_config.json says add_bos_token (read by load_tokenizer)
        try:
            ids = self.tok("a", add_special_tokens=True)["input_ids"]
        except Exception:  # noqa: BLE001 - a tokenizer that cannot say: no BOS
            return False
        return bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (no special tokens added unless `add_bos`; `self.add_bos` is the tokenizer's own
        default for prompts)."""
        if self.backend == "tokenizers":
            ids = self.tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self.tok.encode(text, add_special_tokens=False)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + list(ids)
        return list(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts (parallel in the `tokenizers` backend)."""
        if self.backend == "tokenizers":
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def count(self, text: str) -> int:
        """Number of tokens of `text`."""
        return len(self.encode(text))

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer into `folder` so that `load_tokenizer(folder)` and AutoTokenizer can read it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.backend == "tokenizers":
            with_bos_processor(self.tok, self.add_bos).save(str(folder / "tokenizer.json"))
            cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                   "pad_token": PAD_TOKEN, "add_bos_token": self.add_bos, "add_eos_token": False,
                   "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
            if self.chat_template:
                cfg["chat_template"] = self.chat_template
            (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            self.tok.save_pretrained(str(folder))

    def fingerprint(self) -> str:
        """Short hash identifying the vocabulary (stored with token files to catch mismatches)."""
        import hashlib

        if self.backend == "tokenizers":
            blob = self.tok.to_str()
        else:
            blob = json.dumps(sorted(self.tok.get_vocab().items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_tokenizer(spec: str | os.PathLike | None = None) -> TextTokenizer:
    """Load a tokenizer.

    `spec` is None or "sala" (the shipped BPE), a `tokenizer.json` file, or a model folder (its
    `tokenizer.json` through `tokenizers`, else `transformers.AutoTokenizer`).
    """
    from tokenizers import Tokenizer

    if spec is None or str(spec) in ("sala", "default", "shipped"):
        path = shipped_tokenizer_path()
        if not path.is_file():
            raise FileNotFoundError(f"the shipped tokenizer {path} is missing (run `sala data train-tokenizer`)")
        out = TextTokenizer(Tokenizer.from_file(str(path)), "tokenizers", "sala")
        template = _tokenizer_config(path.parent).get("chat_template")
        out.chat_template = template if isinstance(template, str) else None
        return out
    p = Path(spec)
    if p.is_file() and p.suffix == ".json":
        return TextTokenizer(Tokenizer.from_file(str(p)), "tokenizers", str(p))
    if p.is_dir():
        tj = p / "tokenizer.json"
        if tj.is_file():
            tok = Tokenizer.from_file(str(tj))
            if tok.token_to_id(BOS_TOKEN) is not None and tok.token_to_id(EOS_TOKEN) is not None:
                out = TextTokenizer(tok, "tokenizers", str(p))
                cfg = _tokenizer_config(p)
                out.add_bos = bool(cfg.get("add_bos_token", True))   # sala's folders: BOS unless they say not
                out.chat_template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
                return out
        try:
            from transformers import AutoTokenizer

            return TextTokenizer(AutoTokenizer.from_pretrained(str(p)), "transformers", str(p))
        except Exception as e:  # noqa: BLE001 - report what went wrong in one line
            raise ValueError(f"could not load a tokenizer from folder {p}: {type(e).__name__}: {e}") from None
    raise FileNotFoundError(f"tokenizer {spec!r}: not 'sala', a tokenizer.json file or a model folder")


def with_bos_processor(tok, add_bos: bool):
    """A copy of `tokenizers.Tokenizer` `tok` whose post-processor prepends BOS (add_bos) or nothing, so that
    transformers' tokenizer of a saved folder (`tok(text)`) adds BOS exactly when sala's CLI does."""
    from tokenizers import Tokenizer, processors

    out = Tokenizer.from_str(tok.to_str())
    bos_id = out.token_to_id(BOS_TOKEN)
    if add_bos and bos_id is not None:
        out.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                           special_tokens=[(BOS_TOKEN, bos_id)])
    else:
        out.post_processor = None
    return out


def _tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json of `folder` ({} when absent; UsageError naming the file when it is not valid JSON)."""
    from sala.utils.errors import UsageError

    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{f} is not valid JSON ({e}); fix or remove it") from None
    return cfg if isinstance(cfg, dict) else {}


def render_chat(tok: TextTokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation through the tokenizer's chat template (tokenizer_config.json
    `chat_template`, rendered as transformers' `apply_chat_template` renders it). The template writes the BOS
    itself, so encode the result without `add_bos`. UsageError when the tokenizer has no template."""
    from sala.utils.errors import UsageError

    if not tok.chat_template:
        raise UsageError(f"tokenizer {tok.source} has no chat template (tokenizer_config.json chat_template): "
                         f"prompt it without --chat")
    hf = tok.tok
    if tok.backend == "tokenizers":   # the folder's transformers tokenizer renders it exactly as HF users get it
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(shipped_tokenizer_path().parent) if tok.source == "sala" else tok.source)
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def train_bpe(texts: Iterator[str] | Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) with the special tokens
    `<|pad|>` (0), `<|bos|>` (1), `<|eos|>` (2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 65535:
        raise ValueError(f"train_bpe: vocab_size must be in ({256 + len(SPECIAL_TOKENS)}, 65535], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, "tokenizers", "trained")


def copy_tokenizer_files(src: TextTokenizer, folder: str | os.PathLike) -> None:
    """Save `src` into `folder` (used when the trainer writes a model folder)."""
    if src.backend == "transformers" and src.source and Path(src.source).is_dir():
        for name in os.listdir(src.source):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(os.path.join(src.source, name), os.path.join(folder, name))
        return
    src.save(folder)
