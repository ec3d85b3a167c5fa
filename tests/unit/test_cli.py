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


def test_account_config_keeps_what_an_offline_start_needs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The offline entry survives a save and load byte for byte, a file
    from before it loads without one, and a damaged one is an error."""
    import json

    from megafs.cli.config import AccountConfig, Paths

    paths = Paths(tmp_path)
    plain = AccountConfig(server="https://d.example", email="a@example.org", device="laptop")
    plain.save(paths)
    assert AccountConfig.load(paths) == plain
    kdf = {"alg": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4, "salt": "AAAA"}
    kept = plain.with_offline(kdf, b"\x01" * 110, b"\x02" * 16)
    kept.save(paths)
    loaded = AccountConfig.load(paths)
    assert loaded == kept and loaded is not None and loaded.offline is not None
    assert loaded.offline.keyblob == b"\x01" * 110 and loaded.offline.root_id == b"\x02" * 16
    data = json.loads(paths.account_file.read_text())
    data["offline"]["keyblob"] = "not base64!"
    paths.account_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="damaged"):
        AccountConfig.load(paths)
