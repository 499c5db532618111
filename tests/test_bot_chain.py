"""Reply chains as conversations: how far up a chain the bot reads."""

from __future__ import annotations

from types import SimpleNamespace

from bot.discord_bot.chain import ReplyChains

BOT_ID = 1
USER_ID = 2


def question_replying_to(parent_id: int, content: str) -> SimpleNamespace:
    """Just what ``ReplyChains`` reads of a ``discord.Message``."""
    return SimpleNamespace(
        id=10_000,
        author=SimpleNamespace(id=USER_ID),
        content=content,
        reference=SimpleNamespace(message_id=parent_id, resolved=None),
        channel=None,  # every parent is in the cache: nothing is fetched
    )


async def test_a_reply_chain_is_bounded_in_total_characters_not_only_its_last_message():
    """Twenty messages of 1,900 characters each would hand the worker 38,000 characters."""
    chains = ReplyChains(BOT_ID, max_depth=20, max_chars=6000)
    parent = None
    for i in range(1, 20):
        chains.remember(i, from_bot=i % 2 == 0, content=f"{i} " + "x" * 1900, parent_id=parent)
        parent = i
    chain = await chains.chain(question_replying_to(parent, "and the newest question?"))
    assert chain[-1].content == "and the newest question?"
    assert sum(len(m.content) for m in chain) <= 6000
    assert [m.content.split()[0] for m in chain[:-1]] == ["17", "18", "19"], "the newest kept"


async def test_a_short_chain_is_read_whole():
    chains = ReplyChains(BOT_ID, max_chars=6000)
    chains.remember(1, from_bot=False, content="first question", parent_id=None)
    chains.remember(2, from_bot=True, content="first answer", parent_id=1)
    chain = await chains.chain(question_replying_to(2, "follow-up"))
    assert [m.content for m in chain] == ["first question", "first answer", "follow-up"]
