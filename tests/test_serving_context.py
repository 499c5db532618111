"""bot.serving.context: what every backend sees of a conversation, wherever it came from."""

from __future__ import annotations

from bot.serving.context import SystemPrompted, with_system_prompt
from bot.serving.engine import Message, Sampling
from tests.scripted_engine import ScriptedEngine

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


async def test_the_system_prompt_stage_leads_every_request_and_passes_the_rest_on() -> None:
    backend = ScriptedEngine()
    engine = SystemPrompted(backend, "Answer briefly.")
    await engine.start()
    own: list[Message] = [{"role": "system", "content": "Talk like a pirate."}, *QUESTION]
    seeded = Sampling(seed=3)
    await engine.generate(QUESTION, variant="base", max_new_tokens=2, sampling=seeded)
    await engine.generate(own, variant="base")
    await engine.compare(QUESTION, sampling=seeded)
    led = [{"role": "system", "content": "Answer briefly."}, *QUESTION]
    assert backend.requests == [
        ("base", led, 2),
        ("base", own, None),
        ("base", led, None),
        ("finetuned", led, None),
    ]
    assert backend.samplings == [seeded, None, seeded, seeded]
    assert engine.status().backend == "scripted"
    await engine.close()
    assert not backend.ready
