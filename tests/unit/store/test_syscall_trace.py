"""The strace reader of the durability test (tests/integration/store/syscall_trace.py) on
hand-written traces: it must see a reply that comes before the fsync it depends on."""

from __future__ import annotations

from tests.integration.store.syscall_trace import (
    Call,
    durability_violations,
    file_system,
    parse_strace,
)

REPLY = '7 write(9<TCP:[127.0.0.1:143->127.0.0.1:5000]>, "\\x4f\\x4b", 2) = 2'


def hexed(text: str) -> str:
    return "".join(f"\\x{byte:02x}" for byte in text.encode())


def create(path: str, fd: int = 3) -> str:
    return (f'5 openat(AT_FDCWD<{hexed("/")}>, "{hexed(path)}", O_WRONLY|O_CREAT|O_EXCL, 0600)'
            f" = {fd}<{hexed(path)}>")


def write(path: str, fd: int = 3) -> str:
    return f'5 write({fd}<{hexed(path)}>, "{hexed("data")}", 4) = 4'


def fsync(path: str, fd: int = 3) -> str:
    return f"5 fsync({fd}<{hexed(path)}>) = 0"


def rename(old: str, new: str) -> str:
    return f'5 rename("{hexed(old)}", "{hexed(new)}") = 0'


def violations(*lines: str) -> list[str]:
    calls = parse_strace(lines)
    [reply] = [call for call in calls if "TCP" in call.args]
    return durability_violations(file_system(calls, set(), "/"), reply,
                                 lambda path: path.startswith("/m"))


def test_a_reply_after_every_fsync_is_fine() -> None:
    assert violations(create("/m/tmp/a"), write("/m/tmp/a"), fsync("/m/tmp/a"),
                      rename("/m/tmp/a", "/m/new/a"), fsync("/m/new", fd=4), REPLY) == []


def test_a_write_not_fsynced_before_the_reply_is_seen() -> None:
    [problem] = violations(create("/m/tmp/a"), write("/m/tmp/a"),
                           rename("/m/tmp/a", "/m/new/a"), fsync("/m/new", fd=4), REPLY,
                           fsync("/m/new/a"))
    assert "write of 4 bytes to /m/tmp/a" in problem


def test_a_new_name_without_an_fsync_of_its_directory_is_seen() -> None:
    [problem] = violations(create("/m/tmp/a"), write("/m/tmp/a"), fsync("/m/tmp/a"),
                           rename("/m/tmp/a", "/m/new/a"), REPLY)
    assert "new name /m/new/a" in problem


def test_an_fsync_that_returns_only_after_the_reply_started_does_not_count() -> None:
    problems = violations(create("/m/a"), write("/m/a"), fsync("/m", fd=4),
                          f"5 fsync(3<{hexed('/m/a')}> <unfinished ...>", REPLY,
                          "5 <... fsync resumed>) = 0")
    assert problems and all("/m/a" in problem for problem in problems)


def test_a_file_gone_before_the_reply_needs_no_fsync() -> None:
    assert violations(create("/m/a"), write("/m/a"), f'5 unlink("{hexed("/m/a")}") = 0',
                      REPLY) == []


def test_calls_keep_their_start_and_end_lines() -> None:
    [call] = parse_strace(["5 fsync(3<x> <unfinished ...>", "6 close(4) = 0",
                           "5 <... fsync resumed>) = 0"])[:1]
    assert isinstance(call, Call) and (call.name, call.start, call.end) == ("fsync", 0, 2)


def test_blocks_allocated_and_not_fsynced_before_the_reply_are_seen() -> None:
    """fallocate (the space reserve) changes a file as a write does."""
    allocate = f'5 fallocate(3<{hexed("/m/a")}>, 0, 0, 4096) = 0'
    [problem] = violations(create("/m/a"), allocate, fsync("/m", fd=4), REPLY)
    assert "/m/a" in problem and "not fsynced" in problem
