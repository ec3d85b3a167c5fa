from __future__ import annotations

import argparse

import pytest

from megafs.cli.main import build_parser, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("10K", 10 << 10),
        ("512M", 512 << 20),
        ("5G", 5 << 30),
        ("5GiB", 5 << 30),
        ("1.5g", int(1.5 * (1 << 30))),
        ("2T", 2 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_every_command_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.format_help(), name
        assert sub._name_parser_map[name].description or p.format_usage()
