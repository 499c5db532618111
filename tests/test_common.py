"""freeski_common: the plumbing every stage's command line shares."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from email.utils import formatdate

import pytest

from freeski_common.cli import ArgumentParser
from freeski_common.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, cli_entry
from freeski_common.http import parse_retry_after
from freeski_common.shutdown import stop_requested

pytestmark = pytest.mark.timeout(30)


def test_parse_retry_after() -> None:
    # Moved from the OpenAI engine's tests: the one parser both the crawler and the engine use.
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert 25 < (parse_retry_after(formatdate(time.time() + 30, usegmt=True)) or 0) <= 30


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0.4", 0.4),  # not standard, but sent by some servers; the crawler used to ignore it
        ("0", 0.0),
        ("-1", None),
        ("inf", None),
        ("nan", None),
        ("1e3", None),
        ("", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 -0000", 0.0),
    ],
)
def test_retry_after_forms(header: str, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_an_http_date_counts_from_now() -> None:
    now = 1_445_412_000.0  # 2015-10-21 07:20:00 GMT
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 480.0


def test_cli_entry_reports_a_user_error_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    @cli_entry
    def main() -> int:
        raise UserError("--db: no such store")

    assert main() == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: --db: no such store\n"


def test_cli_entry_says_what_survives_an_interrupt(capsys: pytest.CaptureFixture[str]) -> None:
    @cli_entry(interrupted="interrupted: run it again to continue")
    def main() -> int:
        raise KeyboardInterrupt

    assert main() == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted: run it again to continue\n"


def test_usage_mistakes_raise_a_user_error_naming_the_help() -> None:
    parser = ArgumentParser(prog="python -m thing")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("go")
    sub.add_argument("--count", type=int, required=True)
    with pytest.raises(UserError, match=r"^the following arguments are required: --count"):
        parser.parse_args(["go"])
    with pytest.raises(
        UserError, match=r"invalid int value: 'x' \(see python -m thing go --help\)$"
    ):
        parser.parse_args(["go", "--count", "x"])


async def test_sigterm_sets_the_stop_event_and_the_handler_goes_afterwards() -> None:
    loop = asyncio.get_running_loop()
    with stop_requested() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
    assert not loop.remove_signal_handler(signal.SIGTERM), "the handler must be gone"
    assert not loop.remove_signal_handler(signal.SIGINT)
