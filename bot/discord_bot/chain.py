"""Reply chains as conversations: replying to the bot's answer continues the chat.

Walking a chain costs one REST call per message that is not in memory, so
the messages the bot has seen or written are kept in a bounded LRU cache; its
own answers are cached with their final text (the gateway copy may still
hold a streaming preview). A walk is bounded in messages (``max_depth``) and
in characters (``max_chars``): twenty long messages would otherwise hand the
worker a conversation of tens of thousands of characters to tokenize and
trim, between other users' decoding steps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import discord

from bot.discord_bot.messages import ChainMessage, strip_mentions_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Known:
    from_bot: bool
    content: str
    parent_id: int | None


class ReplyChains:
    """Reads the chain of replies above a message, oldest first, through a cache."""

    def __init__(
        self,
        bot_user_id: int,
        *,
        max_depth: int = 20,
        max_chars: int = 6000,
        cache_size: int = 2048,
    ) -> None:
        self.bot_user_id = bot_user_id
        self.max_depth = max_depth
        self.max_chars = max_chars
        self.cache_size = cache_size
        self._known: OrderedDict[int, _Known] = OrderedDict()

    def remember(
        self, message_id: int, *, from_bot: bool, content: str, parent_id: int | None
    ) -> None:
        self._known[message_id] = _Known(from_bot, content, parent_id)
        self._known.move_to_end(message_id)
        while len(self._known) > self.cache_size:
            self._known.popitem(last=False)

    def remember_message(self, message: discord.Message) -> _Known:
        known = _Known(
            from_bot=message.author.id == self.bot_user_id,
            content=strip_mentions_of(message.content, self.bot_user_id),
            parent_id=message.reference.message_id if message.reference else None,
        )
        if message.id not in self._known:
            self.remember(
                message.id,
                from_bot=known.from_bot,
                content=known.content,
                parent_id=known.parent_id,
            )
        return self._known[message.id]

    def is_reply_to_bot(self, message: discord.Message) -> bool:
        """Whether ``message`` answers one of the bot's messages (with or without a ping)."""
        reference = message.reference
        if reference is None or reference.message_id is None:
            return False
        known = self._known.get(reference.message_id)
        if known is not None:
            return known.from_bot
        resolved = reference.resolved
        return isinstance(resolved, discord.Message) and resolved.author.id == self.bot_user_id

    async def chain(self, message: discord.Message) -> list[ChainMessage]:
        """``message`` and the replies above it, oldest first.

        At most ``max_depth`` messages, and the ones above ``message`` only
        while all of them together stay within ``max_chars`` characters.
        """
        chain = [self.remember_message(message)]
        total = len(chain[0].content)
        parent_id = chain[0].parent_id
        resolved = message.reference.resolved if message.reference else None
        while parent_id is not None and len(chain) < self.max_depth and total < self.max_chars:
            known = self._known.get(parent_id)
            if known is None:
                parent = await self._fetch(message.channel, parent_id, resolved)
                if parent is None:
                    break
                known = self.remember_message(parent)
            resolved = None
            total += len(known.content)
            if total > self.max_chars:
                break  # this one and everything older is beyond the budget
            chain.append(known)
            parent_id = known.parent_id
        return [ChainMessage(k.from_bot, k.content) for k in reversed(chain)]

    @staticmethod
    async def _fetch(
        channel: discord.abc.Messageable, message_id: int, resolved: object
    ) -> discord.Message | None:
        if isinstance(resolved, discord.Message) and resolved.id == message_id:
            return resolved
        try:
            return await channel.fetch_message(message_id)
        except discord.NotFound:  # deleted: the conversation starts after it
            return None
        except discord.HTTPException as exc:
            log.warning("could not fetch message %s of a reply chain: %s", message_id, exc)
            return None
