"""The FETCH fast paths (protocol/fetch.py) answer exactly as the generic `render_fetch`."""

from __future__ import annotations

import itertools

import pytest

from services.store.imap.protocol import fetch
from services.store.imap.protocol.command import FetchAtt, Section
from services.store.mailbox import MessageInfo
from tests.unit.imap.test_fetch import RAW
from tests.unit.imap.test_mime import FORWARD

METADATA = ("UID", "FLAGS", "MODSEQ", "INTERNALDATE", "RFC822.SIZE")
INFOS = [
    MessageInfo(uid=42, guid="g", size=1234, internaldate=837596665.0, flags=frozenset(),
                modseq=7),
    MessageInfo(uid=7, guid="h", size=0, internaldate=1.5, modseq=1,
                flags=frozenset({"\\Seen", "\\Flagged", "$Label1", "\\Deleted"})),
]
EXTRAS = [frozenset(), frozenset({"\\Recent"})]


def combinations() -> list[tuple[str, ...]]:
    found = [combo for n in (1, 2, 3) for combo in itertools.permutations(METADATA, n)]
    return [*found, METADATA, ("FLAGS", "UID", "FLAGS")]  # all of them; a duplicate


@pytest.mark.parametrize("names", combinations())
def test_metadata_renderer_matches_render_fetch(names: tuple[str, ...]) -> None:
    atts = [FetchAtt(name) for name in names]
    for include_uid, include_modseq in itertools.product([False, True], repeat=2):
        render = fetch.MetadataRenderer(atts, include_uid=include_uid,
                                        include_modseq=include_modseq)
        for info, extra in itertools.product(INFOS, EXTRAS):
            expected = fetch.render_fetch(9, info, atts, None, extra_flags=extra,
                                          include_uid=include_uid,
                                          include_modseq=include_modseq)
            assert render(9, info, extra) == expected  # twice: the second from its flag cache
            assert render(9, info, extra) == expected


@pytest.mark.parametrize("names", combinations())
def test_many_lines_at_once_match_render_fetch(names: tuple[str, ...]) -> None:
    atts = [FetchAtt(name) for name in names]
    recent = frozenset({"\\Recent"})
    infos = INFOS * 3
    recent_uids = {INFOS[1].uid}
    render = fetch.MetadataRenderer(atts, include_uid=True)
    expected = [fetch.render_fetch(p + 1, info, atts, None, include_uid=True,
                                   extra_flags=recent if info.uid in recent_uids else frozenset())
                for p, info in enumerate(infos)]
    assert render.lines(range(len(infos)), infos, {}, recent_uids, recent) == b"".join(expected)
    assert render.lines([4, 1], infos, {}, recent_uids, recent) == expected[4] + expected[1]
    # A message changed since the list was taken is read from `changed`.
    moved = INFOS[0]._replace(flags=frozenset({"\\Answered"}), modseq=9)
    changed_expected = fetch.render_fetch(2, moved, atts, None, include_uid=True)
    assert render.lines([1, 4], infos, {1: moved}, recent_uids, recent) == (
        changed_expected + expected[4])


@pytest.mark.parametrize("raw", [RAW, FORWARD])
def test_derived_items_render_as_computed_ones(raw: bytes) -> None:
    info = INFOS[0]
    atts = [FetchAtt("UID"), FetchAtt("ENVELOPE"), FetchAtt("BODYSTRUCTURE"), FetchAtt("BODY"),
            FetchAtt("BODY[]", section=Section((1,)), peek=True)]
    derived = fetch.derive(fetch.cacheable(atts), raw)
    assert set(derived) == {"ENVELOPE", "BODYSTRUCTURE", "BODY"}
    expected = fetch.render_fetch(1, info, atts, raw)
    assert fetch.render_fetch(1, info, atts, raw, derived=derived) == expected
    only_derived = [att for att in atts if att.name != "BODY[]"]
    assert fetch.render_fetch(1, info, only_derived, None, derived=derived) == (
        fetch.render_fetch(1, info, only_derived, raw))


def test_only_cacheable_items() -> None:
    assert fetch.needs_only_cacheable([FetchAtt("UID"), FetchAtt("ENVELOPE")])
    assert not fetch.needs_only_cacheable([FetchAtt("ENVELOPE"), FetchAtt("RFC822.HEADER")])
    assert fetch.cacheable([FetchAtt("BODY"), FetchAtt("FLAGS"), FetchAtt("BODY")]) == ("BODY",)
