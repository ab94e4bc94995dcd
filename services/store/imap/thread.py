"""IMAP THREAD (RFC 5256 sections 4 and 5): ORDEREDSUBJECT and REFERENCES.

`thread` returns a forest of `ThreadNode`s over positions; `format_thread` writes the
`* THREAD` response with sequence numbers or UIDs. A node without a position is a dummy
(a message that is referenced but not in the result) kept by REFERENCES when it holds
several threads together at the top level.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.store.imap.search import Headers, MessageSource, MessageView
from services.store.imap.sort import ascii_casemap, base_subject, first_subject, sent_datetime
from services.store.mailbox import MessageInfo

ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")
_MSG_ID = re.compile(r"<[^<>\s]+>")
# What threading keeps of one message is bounded, whatever its header holds (a sender may
# write a MiB of References or Subject into each message). Threading only asks whether two
# ids, or two base subjects, are equal: one longer than its limit is kept as its start and
# a SHA-256 of the whole, which is longer than the limit, so it equals exactly the keys of
# the same long value.
ID_KEY_MAX = 128  # characters (real ids are shorter; a longer one still compares right)
SUBJECT_KEY_MAX = 256  # octets of the i;ascii-casemap base subject
# Ids of References kept: the first and the last ones. Agents that trim a long References
# (netnews, RFC 5537 3.4.4) drop ids after the first one and keep the latest, and no real
# message carries a hundred; the kept ids still link up in order, so a message is still
# found under its root and its parent.
REFERENCES_FIRST = 8
REFERENCES_LAST = 120


class BadThreadAlgorithm(ValueError):
    pass


@dataclass
class ThreadNode:
    position: int | None  # None: a dummy
    children: list[ThreadNode] = field(default_factory=list)


async def thread(algorithm: str, positions: list[int], messages: Sequence[MessageInfo],
                 source: MessageSource, *, view: MessageView | None = None,
                 ) -> list[ThreadNode]:
    name = algorithm.upper()
    if name not in ALGORITHMS:
        raise BadThreadAlgorithm(algorithm)
    view = view or MessageView(messages, source)
    facts = dict(zip(positions, await view.extract(positions, _Facts.of), strict=True))
    if name == "ORDEREDSUBJECT":
        return ordered_subject(sorted(positions), facts)
    return references(sorted(positions), facts)


@dataclass(frozen=True)
class _Facts:
    """What threading needs to know of one message."""

    date: float
    subject: bytes  # base subject, i;ascii-casemap key
    reply: bool
    message_id: str | None
    parents: tuple[str, ...]  # References, or the first In-Reply-To id

    @classmethod
    def of(cls, headers: Headers, info: MessageInfo) -> _Facts:
        base, reply = base_subject(first_subject(headers))
        own = _MSG_ID.search(headers.first_raw("message-id") or "")
        references = _MSG_ID.findall(" ".join(headers.raw_all("references")))
        if len(references) > REFERENCES_FIRST + REFERENCES_LAST:
            references = references[:REFERENCES_FIRST] + references[-REFERENCES_LAST:]
        if not references:
            in_reply_to = _MSG_ID.search(headers.first_raw("in-reply-to") or "")
            references = [in_reply_to.group()] if in_reply_to else []
        return cls(sent_datetime(headers, info), _bounded(ascii_casemap(base)), reply,
                   _bounded_id(own.group()) if own else None,
                   tuple(map(_bounded_id, references)))


def _bounded(key: bytes) -> bytes:
    if len(key) <= SUBJECT_KEY_MAX:
        return key
    return key[:SUBJECT_KEY_MAX] + hashlib.sha256(key).digest()


def _bounded_id(message_id: str) -> str:
    if len(message_id) <= ID_KEY_MAX:
        return message_id
    whole = message_id.encode("utf-8", "surrogatepass")
    return message_id[:ID_KEY_MAX] + hashlib.sha256(whole).hexdigest()


# ORDEREDSUBJECT (RFC 5256 4)


def ordered_subject(positions: list[int], facts: dict[int, _Facts]) -> list[ThreadNode]:
    """Group by base subject; in each group the earliest message is the parent of all the
    others (siblings, by date); threads ordered by their first message's date."""
    ordered = sorted(positions, key=lambda p: (facts[p].subject, facts[p].date, p))
    threads: list[ThreadNode] = []
    for _, group in itertools.groupby(ordered, key=lambda p: facts[p].subject):
        first, *rest = group
        threads.append(ThreadNode(first, [ThreadNode(p) for p in rest]))
    threads.sort(key=lambda node: _date_key(node, facts))
    return threads


# REFERENCES (RFC 5256 5)


class _Container:
    __slots__ = ("position", "parent", "children")

    def __init__(self, position: int | None = None) -> None:
        self.position = position
        self.parent: _Container | None = None
        self.children: list[_Container] = []

    def reaches(self, other: _Container) -> bool:
        """Is `other` this container or one of its ancestors?"""
        node: _Container | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False

    def set_parent(self, parent: _Container | None) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
        self.parent = parent
        if parent is not None:
            parent.children.append(self)


def references(positions: list[int], facts: dict[int, _Facts]) -> list[ThreadNode]:
    roots = _link(positions, facts)
    roots = _prune(roots)
    roots = _group_by_subject(roots, facts)
    nodes = [_to_node(container, facts) for container in roots]
    nodes.sort(key=lambda node: _date_key(node, facts))
    return nodes


def _link(positions: list[int], facts: dict[int, _Facts]) -> list[_Container]:
    """Steps 1 and 2: one container per message id, linked by References; the roots."""
    table: dict[str, _Container] = {}
    everything: list[_Container] = []

    def container(message_id: str) -> _Container:
        found = table.get(message_id)
        if found is None:
            found = table[message_id] = _Container()
            everything.append(found)
        return found

    for position in positions:
        own = facts[position].message_id
        if own is not None and own in table and table[own].position is None:
            this = table[own]
            this.position = position
        else:
            # No id, or a duplicate id: a container of its own that nothing references.
            this = _Container(position)
            everything.append(this)
            if own is not None and own not in table:
                table[own] = this
        chain = [container(i) for i in facts[position].parents]
        for parent, child in itertools.pairwise(chain):
            if child.parent is None and not _would_loop(parent, child):
                child.set_parent(parent)
        last = chain[-1] if chain else None
        if last is not None and _would_loop(last, this):
            last = None
        if this.parent is not last:
            this.set_parent(last)
    return [c for c in everything if c.parent is None]


def _would_loop(parent: _Container, child: _Container) -> bool:
    """Whether making `child` a child of `parent` closes a loop: `child` is `parent` or one
    of its ancestors. Only a container with children can be an ancestor: asking only then
    keeps a message's long References chain of new ids linear (each walk up the chain made
    it quadratic)."""
    return parent is child or (bool(child.children) and parent.reaches(child))


def _descendants_first(roots: Iterable[_Container]) -> list[_Container]:
    """Every container under `roots` (these included), each after all of its descendants.
    Without recursion: a References chain, or a thread, may be thousands deep."""
    order: list[_Container] = []
    stack = list(roots)
    while stack:
        container = stack.pop()
        order.append(container)
        stack.extend(container.children)
    order.reverse()
    return order


def _prune(roots: list[_Container]) -> list[_Container]:
    """Step 4: drop empty dummies; a dummy's children take its place, except a dummy at the
    top with several children (it keeps them together)."""
    for container in _descendants_first(roots):
        container.children = _kept(container, container.children, top=False)
    return _kept(None, roots, top=True)


def _kept(parent: _Container | None, containers: list[_Container], top: bool
          ) -> list[_Container]:
    """`containers` (already pruned below) with each empty dummy replaced by its children."""
    kept: list[_Container] = []
    for container in containers:
        if container.position is not None or (top and len(container.children) > 1):
            kept.append(container)
        else:
            kept.extend(container.children)
    for container in kept:
        container.parent = parent
    return kept


def _subject_of(container: _Container, facts: dict[int, _Facts]) -> _Facts | None:
    if container.position is not None:
        return facts[container.position]
    # A dummy: its earliest child's subject (RFC 5256 5 step 5.A).
    dated = [facts[c.position] for c in container.children if c.position is not None]
    return min(dated, key=lambda f: f.date) if dated else None


def _group_by_subject(roots: list[_Container], facts: dict[int, _Facts]) -> list[_Container]:
    """Step 5: gather top-level threads whose base subjects are equal."""
    table: dict[bytes, _Container] = {}
    for root in roots:
        found = _subject_of(root, facts)
        if found is None or not found.subject:
            continue
        held = table.get(found.subject)
        if held is None or _prefer(root, held, facts):
            table[found.subject] = root
    merged: list[_Container] = []
    # Where each container is in `merged`: asked of a list, every message without References
    # (each a root) scanned it, and 32,768 of them took 5 s (found in review).
    place: dict[_Container, int] = {}

    def keep(container: _Container) -> None:
        if container not in place:
            place[container] = len(merged)
            merged.append(container)

    for root in roots:
        if root.parent is not None:
            continue  # already put under another top-level container
        found = _subject_of(root, facts)
        subject = found.subject if found is not None else b""
        held = table.get(subject) if subject else None
        if held is None or held is root:
            keep(root)
            continue
        target = _merge(held, root, facts)
        table[subject] = target
        if held in place and target is not held:
            merged[place[held]] = target
            place[target] = place.pop(held)
        else:
            keep(target)
    return [root for root in merged if root.parent is None]


def _prefer(candidate: _Container, held: _Container, facts: dict[int, _Facts]) -> bool:
    """5.B: a dummy wins over a message; a non-reply wins over a reply."""
    if candidate.position is None and held.position is not None:
        return True
    if candidate.position is None or held.position is None:
        return False
    return facts[held.position].reply and not facts[candidate.position].reply


def _merge(held: _Container, root: _Container, facts: dict[int, _Facts]) -> _Container:
    """5.C: put `root` together with `held` (the subject table's container); returns the
    container now at the top for that subject (held, or a new dummy above both)."""
    if held.position is None and root.position is None:
        for child in list(root.children):
            child.set_parent(held)
        root.parent = held  # marks it absorbed; it has no children left
        return held
    if held.position is None:
        root.set_parent(held)
        return held
    if root.position is None:
        # held becomes a child of the dummy; the dummy is a root, so keep it on top.
        held.set_parent(root)
        return root
    held_reply = facts[held.position].reply
    root_reply = facts[root.position].reply
    if not held_reply and root_reply:
        root.set_parent(held)
        return held
    dummy = _Container()
    held.set_parent(dummy)
    root.set_parent(dummy)
    return dummy


def _to_node(root: _Container, facts: dict[int, _Facts]) -> ThreadNode:
    """Step 6: siblings ordered by sent date (a dummy by its earliest child)."""
    nodes: dict[_Container, ThreadNode] = {}
    for container in _descendants_first([root]):
        children = [nodes.pop(child) for child in container.children]
        children.sort(key=lambda node: _date_key(node, facts))
        nodes[container] = ThreadNode(container.position, children)
    return nodes[root]


def _date_key(node: ThreadNode, facts: dict[int, _Facts]) -> tuple[float, int]:
    while node.position is None:
        if not node.children:
            return float("inf"), -1
        node = node.children[0]
    return facts[node.position].date, node.position


# The response


def format_thread(threads: Sequence[ThreadNode], number_of: Callable[[int], int]) -> bytes:
    """The whole untagged response without CRLF: b"* THREAD (2)(3 6 (4 23)(44 7 96))".
    `number_of` maps a position to a sequence number (position + 1) or a UID."""
    parts = [b"* THREAD"]
    if threads:
        parts.append(b"".join(b"(" + _members(node, number_of) + b")" for node in threads))
    return b" ".join(parts)


def _members(node: ThreadNode, number_of: Callable[[int], int]) -> bytes:
    """RFC 5256 thread-members: numbers along a single-child chain, then one parenthesised
    list per child where the thread branches. Without recursion: threads may branch
    thousands deep."""
    out = bytearray()
    stack: list[ThreadNode | bytes] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            out += item
            continue
        numbers, branches = _chain(item, number_of)
        out += b" ".join(numbers)
        if numbers and branches:
            out += b" "
        for child in reversed(branches):
            stack += [b")", child, b"("]
    return bytes(out)


def _chain(node: ThreadNode, number_of: Callable[[int], int]
           ) -> tuple[list[bytes], list[ThreadNode]]:
    """The numbers along `node`'s single-child chain, and the children where it branches."""
    numbers: list[bytes] = []
    while True:
        if node.position is not None:
            numbers.append(str(number_of(node.position)).encode())
        if len(node.children) == 1 and node.position is not None:
            node = node.children[0]
            continue
        return numbers, node.children
