"""Bad input meets one line naming the file, field or value (exit 2), never a traceback; `--debug` keeps it.

Most cases run `sala.cli.main` (the console script's entry point) in this process; the cases where the process
boundary matters (the interpreter's traceback under --debug, a fresh interpreter without `import sala`) run a
subprocess."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sala.cli import main
from sala.utils.bundled import BUNDLED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


class Started:
    """A subprocess started now and read when a test needs its result (once; the result is kept)."""

    def __init__(self, cmd: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._result: subprocess.CompletedProcess | None = None

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        if self._result is None:
            out, err = self.proc.communicate(timeout=timeout)
            self._result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._result


AUTO_MODEL_CODE = ("from transformers import AutoModelForCausalLM\n"
                   "try:\n"
                   f"    AutoModelForCausalLM.from_pretrained({str(BUNDLED_MODEL_DIR)!r})\n"
                   "except Exception as e:\n"
                   "    print('ERROR', e)\n"
                   f"m = AutoModelForCausalLM.from_pretrained({str(BUNDLED_MODEL_DIR)!r}, trust_remote_code=True)\n"
                   "print('REMOTE', type(m).__name__)\n"
                   "import sala\n"
                   f"m = AutoModelForCausalLM.from_pretrained({str(BUNDLED_MODEL_DIR)!r})\n"
                   "print('IMPORTED', type(m).__module__, type(m).__name__)\n")


@pytest.fixture(scope="module")
def fresh_interpreters(tmp_path_factory):
    """The two checks that need an interpreter of their own, both started by the module's first test: they
    mostly import torch and transformers, beside each other and beside the in-process tests that follow.
    "debug": `python -m sala.cli --debug train BAD.yaml`; "auto_model": AUTO_MODEL_CODE."""
    bad = tmp_path_factory.mktemp("debug") / "bad.yaml"
    bad.write_text("stages: [\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = {"debug": Started([sys.executable, "-m", "sala.cli", "--debug", "train", str(bad)], env),
               "auto_model": Started([sys.executable, "-c", AUTO_MODEL_CODE], env)}
    yield started
    for s in started.values():
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def unwritable(tmp_path: Path) -> Path:
    """A folder nobody may create files in: a chmod 0555 folder, or (as root, who ignores modes) one under /sys."""
    if os.geteuid() == 0:
        return Path("/sys/sala-test-readonly")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "sub"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A copy of the bundled model (tests break copies, never the package's own files)."""
    if not (BUNDLED_MODEL_DIR / "config.json").is_file():
        pytest.fail("the bundled model is missing from sala/assets/model")
    dst = tmp_path_factory.mktemp("bundled") / "model"
    shutil.copytree(BUNDLED_MODEL_DIR, dst, ignore=shutil.ignore_patterns("teacher"))
    return dst


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs") / "docs"
    d.mkdir()
    for i in range(6):
        (d / f"d{i}.txt").write_text(f"document {i} " + "alpha beta " * 20)
    return d


# --------------------------------------------------------------------------- generic
def test_traceback_only_with_debug(tmp_path, capsys, fresh_interpreters):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid YAML at line" in err, err
    # --debug lets the exception leave `sala.cli.main`: the interpreter of `python -m sala.cli` prints the traceback
    r = fresh_interpreters["debug"].result()
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_device_cuda_without_cuda(bundled, capsys):
    if torch.cuda.is_available():
        bad = f"cuda:{torch.cuda.device_count()}"
        assert main(["generate", "--model", str(bundled), "--prompt", "x", "--device", bad]) == 2
        one_line_error(capsys, "GPU(s) are visible")
        return
    assert main(["generate", "--model", str(bundled), "--prompt", "x", "--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "--device cpu")
    assert main(["eval", "niah", "--model", str(bundled), "--device", "cuda", "--lengths", "1k"]) == 2
    one_line_error(capsys, "--device cuda")


def test_invalid_config_json_names_file_and_line(bundled, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(bundled, broken)
    (broken / "config.json").write_text('{"model_type": "minicpm_sala",\n "hidden_size": }\n')
    assert main(["generate", "--model", str(broken), "--prompt", "x"]) == 2
    one_line_error(capsys, str(broken / "config.json"), "line 2")
    cfg = json.loads((bundled / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(broken), "--context", "1k"]) == 2
    one_line_error(capsys, str(broken / "config.json"), "num_key_value_heads")
    assert main(["eval", "niah", "--model", str(broken), "--lengths", "1k", "--device", "cpu"]) == 2
    one_line_error(capsys, "num_key_value_heads")


def test_non_finite_weights_refused_naming_the_tensor(bundled, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(bundled, bad)
    sd = load_file(str(bad / "model.safetensors"))
    name = sorted(k for k in sd if k.endswith("mlp.up_proj.weight"))[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(["generate", "--model", str(bad), "--prompt", "hello", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 2
    one_line_error(capsys, name, "non-finite", "NaN")
    from sala.modeling import SalaForCausalLM

    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        SalaForCausalLM.from_pretrained(str(bad))


# --------------------------------------------------------------------------- generate
def test_generate_argument_errors(bundled, tmp_path, capsys):
    for flag in ("--chunk-size", "--max-new-tokens"):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(bundled), "--prompt", "x", flag, "0"])
        assert e.value.code == 2
        assert "must be >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(bundled), "--prompt-file", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path), "is a directory")


def test_generate_refuses_beyond_the_context_limit_and_memory_before_allocating(bundled, capsys, monkeypatch):
    limit = json.loads((bundled / "config.json").read_text())["max_position_embeddings"]
    assert main(["generate", "--model", str(bundled), "--prompt", "x", "--device", "cpu",
                 "--max-new-tokens", str(10**12)]) == 2
    one_line_error(capsys, f"{limit:,}", "max_position_embeddings", "1,000,000,000,00")
    from sala.engine import memory

    avail = memory.device_free_bytes("cpu")
    assert avail is None or avail > 0
    # a machine with 700 MiB available: the request is refused with the plan's numbers, before any allocation
    monkeypatch.setattr(memory, "system_available_bytes", lambda meminfo="/proc/meminfo": 700 << 20)
    assert main(["generate", "--model", str(bundled), "--prompt", "x", "--device", "cpu",
                 "--max-new-tokens", "100000"]) == 1
    one_line_error(capsys, "not enough memory", "700.0 MiB free", "the largest context that fits")


def test_stop_strings_interpret_escapes(bundled, capsys):
    from sala.commands.generate import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape(r"\u00e9\x41\U0001F600 é \q") == "\u00e9A\U0001F600 é \\q"
    args = ["generate", "--model", str(bundled), "--prompt", "def main():", "--max-new-tokens", "24", "--device",
            "cpu", "--ignore-eos", "--no-progress"]
    assert main(args) == 0
    full = capsys.readouterr().out[:-1]
    cut = next((i for i, ch in enumerate(full) if i > 0 and not ch.isalnum()), None)
    assert cut is not None, full
    escaped = "\\u%04x" % ord(full[cut])                 # the first non-alphanumeric character, written as \uXXXX
    assert main([*args, "--stop", escaped]) == 0
    assert capsys.readouterr().out == full[:cut] + "\n"


def test_hf_tokenizer_and_cli_give_the_same_text_and_chat(bundled, capsys):
    """The README's transformers example and `sala generate` agree: the tokenizer's own BOS setting decides."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sala  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(bundled), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(bundled))
    ids = tok("The capital of France is", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    hf = tok.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:],
                    skip_special_tokens=True)
    assert main(["generate", "--model", str(bundled), "--prompt", "The capital of France is", "--max-new-tokens",
                 "8", "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out == hf + "\n"
    # --chat renders the tokenizer's template, the same text transformers renders
    from sala.modeling.tokenizer import load_tokenizer, render_chat

    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render_chat(load_tokenizer(bundled), msgs) == text and text.startswith(tok.bos_token)
    assert main(["generate", "--model", str(bundled), "--chat", "--prompt", "hi", "--max-new-tokens", "3",
                 "--device", "cpu", "--no-progress", "--stats"]) == 0
    prompt_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert f"[prompt {prompt_tokens} tokens" in capsys.readouterr().err


def test_chat_without_a_template_is_refused(tmp_path, capsys):
    from sala.modeling import SalaConfig, SalaForCausalLM
    from sala.modeling.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    tok.chat_template = None
    folder = tmp_path / "m"
    SalaForCausalLM(SalaConfig.from_preset("sala-tiny", vocab_size=tok.vocab_size)).save_pretrained(folder)
    tok.save(folder)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--chat", "--prompt", "hi", "--device", "cpu"]) == 2
    one_line_error(capsys, "no chat template", "without --chat")


def test_auto_model_without_import_sala_says_what_to_do(fresh_interpreters):
    """A fresh interpreter (AUTO_MODEL_CODE): without `import sala`, transformers asks for trust_remote_code; with
    it, the folder's auto_map loads the installed package's class; with sala imported (sala/__init__ registers the
    classes), the plain call of the README's transformers example (run in-process by
    tests/eval/test_eval_interrupt.py) loads the package's class too."""
    r = fresh_interpreters["auto_model"].result()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-2:] == ["REMOTE SalaForCausalLM", "IMPORTED sala.modeling.modeling_sala SalaForCausalLM"], r.stdout
    # a fresh interpreter: the class comes from the folder's auto_map, so transformers asks for trust_remote_code
    # (or `import sala`), not for a newer transformers
    assert "ERROR" in r.stdout and "trust_remote_code" in r.stdout and "update" not in r.stdout.lower()


# --------------------------------------------------------------------------- data prepare
def test_prepare_errors_and_reuse(docs, tmp_path, capsys):
    out = tmp_path / "packed"
    args = ["data", "prepare", str(out), "--source", str(docs), "--val-fraction", "0.2"]
    assert main([*args, "--max-docs", "0"]) == 2
    one_line_error(capsys, "--max-docs must be >= 1", "got 0")
    assert main(["data", "prepare", str(unwritable(tmp_path) / "p"), "--source", str(docs)]) == 2
    one_line_error(capsys, "is not writable")
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["val_fraction"] == 0.2 and meta["options"]["max_docs"] is None
    capsys.readouterr()
    assert main(args) == 0
    assert "already holds this dataset (same options)" in capsys.readouterr().out
    assert main([*args, "--seed", "3"]) == 2
    one_line_error(capsys, "other options", "seed: 0 -> 3", "--overwrite")
    assert main([*args, "--seed", "3", "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["options"]["seed"] == 3
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["data", "prepare", str(user), "--source", str(docs), "--overwrite"]) == 2
    one_line_error(capsys, "not a packed dataset")
    assert (user / "notes.txt").read_text() == "keep me"


def test_prepare_full_disk_names_the_file(docs, tmp_path, capsys, monkeypatch):
    from sala.data import packed

    def full(self, split, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed.PackedWriter, "add", full)
    assert main(["data", "prepare", str(tmp_path / "p"), "--source", str(docs)]) == 1
    one_line_error(capsys, "the disk is full", "train.bin")
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".tmp-*"))


def test_torch_short_write_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    from sala.train import checkpoint as ckpt
    from sala.utils.errors import DiskFullError

    def short_write(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1297280 vs 1297232")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(DiskFullError, match="model.pt"):
        ckpt._save({}, tmp_path / "model.pt")


# --------------------------------------------------------------------------- eval
def test_eval_checks_before_running(bundled, tmp_path, capsys):
    assert main(["eval", "niah", "--model", str(bundled), "--num-samples", "0", "--lengths", "1k"]) == 2
    one_line_error(capsys, "--num-samples must be >= 1")
    ro = unwritable(tmp_path)
    assert main(["eval", "niah", "--model", str(bundled), "--lengths", "1k", "--out", str(ro / "r.json")]) == 2
    one_line_error(capsys, "is not writable")
    assert main(["eval", "niah", "--model", str(bundled), "--lengths", "1k", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory")
