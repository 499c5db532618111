"""bot.serving.context: what every backend sees of a conversation, wherever it came from."""

from __future__ import annotations

from bot.serving.context import with_system_prompt
from bot.serving.engine import Message

QUESTION: list[Message] = [{"role": "user", "content": "wax for spring slush?"}]


def test_the_system_prompt_leads_the_conversation() -> None:
    assert with_system_prompt(QUESTION, "Answer briefly.") == [
        {"role": "system", "content": "Answer briefly."},
        *QUESTION,
    ]


def test_no_system_prompt_changes_nothing_and_the_input_is_not_modified() -> None:
    chat = list(QUESTION)
    assert with_system_prompt(chat, "") == QUESTION
    with_system_prompt(chat, "Answer briefly.")
    assert chat == QUESTION


def test_a_conversation_with_its_own_system_message_keeps_it_and_twice_is_once() -> None:
    own: list[Message] = [{"role": "system", "content": "Talk like a pirate."}, *QUESTION]
    assert with_system_prompt(own, "Answer briefly.") == own
    once = with_system_prompt(QUESTION, "Answer briefly.")
    assert with_system_prompt(once, "Answer briefly.") == once
