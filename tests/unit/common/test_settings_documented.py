"""README's settings table and common/settings.py name the same TIERMAIL_* settings with the
same defaults, so that neither can drift from the other."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from common.settings import PREFIX, Settings

README = Path(__file__).resolve().parents[3] / "README.md"
CODE = Settings(hostname="host.example")
# Defaults the table describes in words, since they are not a fixed value.
DESCRIBED = {
    "TIERMAIL_HOSTNAME": "the machine's FQDN",
    "TIERMAIL_TLS_CERT": "`<data dir>/tls/cert.pem`",
    "TIERMAIL_TLS_KEY": "`key.pem`",
}


def documented() -> dict[str, str]:
    """Each setting in README's table -> the default the table gives it. A row may name
    several settings (`A` / `B`) with as many defaults (`1` / `2`)."""
    table: dict[str, str] = {}
    for line in README.read_text().splitlines():
        if not line.startswith("| `TIERMAIL_"):
            continue
        names_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        names = re.findall(r"`(TIERMAIL_\w+)`", names_cell)
        defaults = _split_defaults(default_cell, len(names))
        assert len(defaults) == len(names), f"README row {names}: defaults {default_cell!r}"
        table.update(zip(names, defaults, strict=True))
    return table


def _split_defaults(cell: str, count: int) -> list[str]:
    if count == 1:
        return [cell]
    parts = [part.strip() for part in re.split(r" / |, ", cell)]
    return parts if len(parts) == count else [cell]


def code_default_matches(name: str, text: str) -> bool:
    value = getattr(CODE, name[len(PREFIX):].lower())
    if name in DESCRIBED:
        return text == DESCRIBED[name]
    quoted = re.match(r"`([^`]*)`", text)
    if quoted is None:  # words: "empty", "(empty)", "empty: what that means"
        return value in ("", None) and re.match(r"\(?empty\b", text) is not None
    shown = quoted.group(1)
    if isinstance(value, Path):
        return Path(shown) == value
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        return float(shown) == value
    return shown == value


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    in_code = {PREFIX + f.name.upper() for f in fields(Settings)}
    in_readme = set(documented())
    assert sorted(in_code - in_readme) == [], "settings missing from README's table"
    assert sorted(in_readme - in_code) == [], "README documents settings the code lacks"


@pytest.mark.parametrize("name", sorted(documented()))
def test_documented_default_is_the_code_default(name: str) -> None:
    text = documented()[name]
    assert code_default_matches(name, text), (
        f"README says {name} defaults to {text!r}; common/settings.py has "
        f"{getattr(CODE, name[len(PREFIX):].lower())!r}")
