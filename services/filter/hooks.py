"""aiosmtpd's tables of a connection's hooks, built once per class instead of per connection.

aiosmtpd's SMTP.__init__ finds a connection's command methods (smtp_*), AUTH mechanisms
(auth_*) and handler hooks (handle_*) with dir(), inspect.getmembers() and a bound method for
every name, on every new connection: 12 of the 25 µs that a new connection cost here. While
it runs (`hooks_hidden`) our classes answer dir() with nothing, so it builds empty tables;
the connection then puts in `BoundHooks` tables, which find a hook in a per-class dict and
bind it only when it is looked up.

The AUTH table stays empty, as it was: the filter neither advertises nor accepts AUTH
(aiosmtpd's only mechanisms, LOGIN and PLAIN, are excluded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

_hidden = False
_functions_by_class: dict[tuple[type, str], dict[str, Any]] = {}


@contextlib.contextmanager
def hooks_hidden() -> Iterator[None]:
    """Around aiosmtpd's SMTP.__init__: `hook_dir` answers nothing meanwhile."""
    global _hidden
    _hidden = True
    try:
        yield
    finally:
        _hidden = False


def hook_dir(default: Callable[[], Iterable[str]]) -> list[str]:
    """What our classes' __dir__ answers: nothing while aiosmtpd builds its tables, else the
    usual names (`default`)."""
    return [] if _hidden else list(default())


class BoundHooks(Mapping[str, Callable[..., Any]]):
    """`owner`'s methods named `prefix` + a command, by command ("smtp_" + "MAIL": "MAIL"),
    as aiosmtpd's tables hold them; each is bound when looked up."""

    __slots__ = ("_owner", "_functions")

    def __init__(self, owner: object, prefix: str) -> None:
        self._owner: object | None = owner
        self._functions = _class_hooks(type(owner), prefix)

    def __getitem__(self, command: str) -> Callable[..., Any]:
        function = self._functions[command]
        return function.__get__(self._owner, type(self._owner))

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)

    def clear(self) -> None:
        """Forget the owner (a connection that has ended: no reference cycle is left)."""
        self._owner = None
        self._functions = {}


def _class_hooks(cls: type, prefix: str) -> dict[str, Any]:
    """The attributes of `cls` named `prefix` + a command, as found along its MRO."""
    key = (cls, prefix)
    functions = _functions_by_class.get(key)
    if functions is None:
        functions = {}
        for klass in reversed(cls.__mro__):  # a subclass's definition wins
            for name, value in vars(klass).items():
                if name.startswith(prefix):
                    functions[name[len(prefix):]] = value
        _functions_by_class[key] = functions
    return functions
