"""aiosmtpd's tables of a connection's hooks, built once per class (services/filter/hooks.py)."""

from __future__ import annotations

from services.filter.hooks import BoundHooks, hooks_hidden
from services.filter.server import FilterSMTP
from services.filter.session import FilterSession


class Base:
    def smtp_NOOP(self) -> tuple[str, object]:
        return "base", self

    def smtp_HELP(self) -> tuple[str, object]:
        return "help", self


class Child(Base):
    def smtp_NOOP(self) -> tuple[str, object]:
        return "child", self

    def not_a_hook(self) -> None:
        """Not in the table."""


def test_a_table_finds_the_subclass_method_and_binds_it_to_its_owner() -> None:
    owner = Child()
    table = BoundHooks(owner, "smtp_")
    assert sorted(table) == ["HELP", "NOOP"]
    assert table["NOOP"]() == ("child", owner)
    assert table["HELP"]() == ("help", owner)
    assert "NOOP" in table and table.get("QUIT") is None and len(table) == 2


def test_a_cleared_table_keeps_no_reference_to_its_owner() -> None:
    table = BoundHooks(Child(), "smtp_")
    table.clear()
    assert table.get("NOOP") is None and len(table) == 0


def test_the_tables_hold_what_aiosmtpd_finds_with_dir() -> None:
    # aiosmtpd's SMTP.__init__: {name without prefix: getattr(obj, name) for name in dir(obj)}
    for cls, prefix in ((FilterSMTP, "smtp_"), (FilterSession, "handle_")):
        expected = {name.removeprefix(prefix): getattr(cls, name)
                    for name in dir(cls) if name.startswith(prefix)}
        owner = object.__new__(cls)
        table = BoundHooks(owner, prefix)
        assert {command: method.__func__ for command, method in table.items()} == expected
        assert all(method.__self__ is owner for method in table.values())
    commands = set(BoundHooks(object.__new__(FilterSMTP), "smtp_"))
    assert {"EHLO", "MAIL", "RCPT", "DATA", "QUIT"} <= commands


def test_our_classes_answer_dir_with_nothing_only_while_aiosmtpd_builds_its_tables() -> None:
    session = object.__new__(FilterSession)
    with hooks_hidden():
        assert dir(session) == []
    assert "handle_DATA" in dir(session) and "log_extra" in dir(session)
