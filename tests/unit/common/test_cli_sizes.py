"""Sizes and counts on the command line (`tiermail user quota ADDR SIZE`, `list --limit N`)."""

from __future__ import annotations

import pytest

from services.cli import (
    CommandError,
    UsageError,
    approximate_size,
    build_parser,
    format_size,
    parse_size,
)


@pytest.mark.parametrize(("text", "octets"), [
    ("0", 0), ("1048576", 1048576), ("500M", 500 * 1024 ** 2), ("2G", 2 * 1024 ** 3),
    ("2g", 2 * 1024 ** 3), ("1.5K", 1536), ("10MB", 10 * 1024 ** 2), ("1GiB", 1024 ** 3),
    ("1T", 1024 ** 4), ("default", None), ("DEFAULT", None), ("100B", 100), ("1b", 1),
    ("1.5", 1), ("0.0", 0),
    # what `user list` prints for 0, and the word an operator reaches for, are 0 too
    ("unlimited", 0), ("none", 0), ("None", 0),
    # exact: read as a float, these became 123456789012345680 and a refused 2^63
    ("123456789012345678", 123456789012345678), ("9223372036854775807", 2**63 - 1),
    ("8589934591G", 8589934591 * 1024**3),
])
def test_parse_size(text: str, octets: int | None) -> None:
    assert parse_size(text) == octets


@pytest.mark.parametrize("text", ["", "-1", "1X", "M", "KB", "nan", "inf", "1e999", "ten", "1e30",
                                  "9223372036854775808", "1e18G",
                                  # below one octet: rounded to 0, "unlimited", they were taken
                                  "0.4", "0.0001K", "1e-10G", "B"])
def test_parse_size_refuses(text: str) -> None:
    """As a usage error, exit 2 like argparse's own bad values (it was 1)."""
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize("text", ["-1", "-0.5K", " -2G"])
def test_a_negative_size_is_refused_as_such(text: str) -> None:
    with pytest.raises(CommandError, match="cannot be negative"):
        parse_size(text)


@pytest.mark.parametrize(("octets", "text"), [
    (0, "0"), (1000, "1000"), (1024, "1K"), (500 * 1024 ** 2, "500M"), (2 * 1024 ** 3, "2G"),
    (1536, "1536"),
])
def test_format_size(octets: int, text: str) -> None:
    assert format_size(octets) == text


@pytest.mark.parametrize(("octets", "text"), [
    (0, "0"), (538, "538"), (2048, "2K"), (2_293_314, "2.2M"), (3 * 1024**3, "3G"),
    (1024**3 + 1, "1.0G")])
def test_a_usage_is_shown_approximately_where_it_is_not_round(octets: int, text: str) -> None:
    """`user quota` printed 'in use: 2293314 (2293314 octets)'."""
    assert approximate_size(octets) == text


@pytest.mark.parametrize("limit", ["-1", "ten", ""])
def test_held_mail_list_refuses_a_limit_that_is_no_count(
        limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A negative --limit was taken and listed up to 10,000 messages."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["quarantine", "list", "--limit", limit])
    assert exit_info.value.code == 2
    assert "not a count" in capsys.readouterr().err


def test_held_mail_list_takes_zero_as_a_limit() -> None:
    assert build_parser().parse_args(["deadletters", "list", "--limit", "0"]).limit == 0
