"""How addresses and domains are normalised for storage and lookup (common/directory.py)."""

import pytest

from common.directory import normalize_address, normalize_domain


@pytest.mark.parametrize(("given", "stored"), [
    ("<Alice@Example.ORG>", "alice@example.org"),
    ("x@Bücher.Example", "x@xn--bcher-kva.example"),  # an SMTPUTF8 RCPT TO's U-label
    ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
    ("@bücher.example", "@xn--bcher-kva.example"),  # a catch-all alias source
    ("@Example.ORG.", "@example.org"),  # ... as its domain is stored (it never matched)
    ("@ example.org", "@example.org"),
    ("x@ΟΔΟΣ-1.example", "x@xn---1-k9b7bby.example"),  # UTS 46's σ, not lower()'s ς
    ("x@exa mple\u00e9.", "x@exa mple\u00e9"),  # not IDNA: left to match nothing
    ("Bob@Example.ORG.", "bob@example.org"),  # a login so written failed (found in review)
    ("postmaster", "postmaster"),
])
def test_addresses(given: str, stored: str) -> None:
    assert normalize_address(given) == stored


@pytest.mark.parametrize(("given", "stored"), [
    (" Example.ORG. ", "example.org"),  # the fully qualified form's final dot
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("straße.example", "xn--strae-oqa.example"),  # IDNA 2008: not "strasse"
    ("ΟΔΟΣ-1.example", "xn---1-k9b7bby.example"),  # as οδοσ-1.example: one domain
    ("οδοσ-1.example", "xn---1-k9b7bby.example"),
])
def test_domains(given: str, stored: str) -> None:
    assert normalize_domain(given) == stored
