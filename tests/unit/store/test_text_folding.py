"""A scan folds case exactly as the full-text index does (services/store/backends/textindex.py
`fold`), for every code point, or a search finds a message once the indexer has reached it and
not before (a capital sigma ending a word did)."""

from __future__ import annotations

import sqlite3

from services.store.backends.textindex import SCHEMA, fold

PLANES = 0x110000


def test_fold_is_the_index_tokenizers_folding_for_every_code_point() -> None:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)  # the index's own table and tokenizer
    db.execute("CREATE VIRTUAL TABLE terms USING fts5vocab(text, 'instance')")
    codes = [code for code in range(1, PLANES) if not 0xD800 <= code <= 0xDFFF]
    with db:
        db.executemany("INSERT INTO text(rowid, head, body) VALUES (?, '', ?)",
                       ((code, f"q{chr(code)}z") for code in codes))
    indexed = {code: term[1] for code, term in db.execute("SELECT doc, term FROM terms")}
    db.close()
    differ = {hex(code): (chr(code), fold(chr(code)), indexed[code]) for code in codes
              if fold(chr(code)) != indexed[code]}
    assert not differ


def test_a_word_ending_in_a_capital_sigma_folds_as_the_index_does() -> None:
    assert fold("ΟΔΟΣ") in fold("ΟΔΟΣΜΟΥ")
    assert fold("δρόμος") == fold("ΔΡΌΜΟΣ") == fold("δρόμοσ")
