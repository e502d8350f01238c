import pytest
import torch

from sala.cli import build_parser, main
from sala.utils.lengths import format_length, parse_length, parse_lengths


def test_parse_lengths():
    assert parse_lengths("4k, 64K,1M,1000") == [4096, 65536, 1 << 20, 1000]
    assert format_length(1 << 21) == "2M" and format_length(65536) == "64K" and format_length(1000) == "1000"
    for bad in ("abc", "-4k", "1.5"):
        with pytest.raises(ValueError, match="token count"):
            parse_length(bad)


def test_cli_lists_commands_and_rejects_bad_input(capsys):
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert {"bench"} <= names
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--lengths", "lots"])
    assert "not a token count" in capsys.readouterr().err


def test_bench_dispatch_reaches_each_benchmark_with_its_defaults(monkeypatch, tmp_path, capsys):
    """`sala bench` calls each benchmark's run() with only the arguments it takes (no GPU needed to check)."""
    import importlib
    seen = {}
    for name in ("sala.bench.kernels_lightning", "sala.bench.kernels_sparse", "sala.bench.latency"):
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "run", _recorder(seen, name, module.run))
    out = str(tmp_path / "k.json")
    assert main(["bench", "kernels", "--op", "all", "--out", out, "--no-baseline"]) == 0
    assert main(["bench", "latency", "--lengths", "64k", "--out", out]) == 0
    assert seen["sala.bench.kernels_lightning"]["with_fla"] is False
    assert seen["sala.bench.kernels_sparse"]["out_path"].endswith("k_sparse.json")
    assert seen["sala.bench.latency"]["lengths"] == [65536]
    assert "variants" not in seen["sala.bench.kernels_sparse"] and "compile" not in seen["sala.bench.latency"]
    assert main(["bench", "kernels", "--op", "sparse", "--out", out, "--variants", "chunk1g,decode",
                 "--tune"]) == 0
    assert seen["sala.bench.kernels_sparse"]["variants"] == ["default", "chunk1g", "decode"]
    assert seen["sala.bench.kernels_sparse"]["tune"] is True
    assert "backward_max_len" not in seen["sala.bench.kernels_sparse"]
    assert main(["bench", "kernels", "--op", "sparse", "--out", out, "--backward-max-len", "256k"]) == 0
    assert seen["sala.bench.kernels_sparse"]["backward_max_len"] == 262144
    assert main(["bench", "latency", "--lengths", "64k", "--out", out, "--compile"]) == 0
    assert seen["sala.bench.latency"]["compile"] is True
    assert seen["sala.bench.latency"]["quantization"] == "none"
    if not torch.cuda.is_available():      # FP8 refused before the benchmark starts
        seen.pop("sala.bench.latency")
        assert main(["bench", "latency", "--lengths", "64k", "--out", out, "--quantization", "fp8"]) != 0
        assert "FP8 quantization is not supported here" in capsys.readouterr().err
        assert "sala.bench.latency" not in seen
    assert main(["bench", "kernels", "--op", "sparse", "--out", out, "--variants", "nonsense"]) != 0
    assert "unknown variants ['nonsense']" in capsys.readouterr().err


def _recorder(seen, name, real):
    import inspect

    def fake(**kwargs):
        inspect.signature(real).bind(**kwargs)     # the real function accepts exactly these arguments
        seen[name] = kwargs
        return {}
    fake.__signature__ = inspect.signature(real)
    return fake
