import pytest

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
