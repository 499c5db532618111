"""What the bot does: answer mentions, DMs and replies, and the /ask, /compare, /status commands.

``/ask`` and ``/compare`` pick any served model by name (autocompleted from
the engine's list); ``/compare`` can be blind, hiding which model wrote which
side until the vote (``COMPARE_BLIND`` or ``blind:true``).

Every handler checks the allow lists, the question length and the asker's
rate limit first, streams its answer through the :class:`~bot.serving.engine.Engine`
and turns any failure into a short message for the user and a log line with
context for the operator, so one bad request never takes the bot down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_bot.chain import ReplyChains
from bot.discord_bot.feedback_views import DiscordFeedback
from bot.discord_bot.messages import (
    chain_to_messages,
    sources_block,
    split_message,
    strip_mentions_of,
    with_sources,
)
from bot.discord_bot.replies import (
    STREAMING_MARK,
    InteractionReply,
    LiveText,
    MessageReply,
    ReplyTarget,
    ThrottledEdits,
    view_here,
)
from bot.discord_bot.served import Sides, comparison, name_choices, unknown
from bot.discord_bot.settings import BotSettings
from bot.serving.adapters import BASE, FINETUNED, ServedModels
from bot.serving.engine import Answer, Engine, EngineError, Message, Variant
from bot.serving.ratelimit import RateLimiter

log = logging.getLogger(__name__)

CONTEXT_CHARS = 6000  # reply-chain context; the worker trims again, exactly, in tokens
EMBED_FIELD_LIMIT = 1024
SORRY = "Sorry, something went wrong while answering that. The error was logged."
NOTES = {
    "length": "_(cut at the answer length limit)_",
    "cancelled": "_(stopped: the bot is restarting, ask again in a minute)_",
}


class AnswerCog(commands.Cog):
    """Questions in, streamed answers out.

    Everything it needs is passed in, nothing is read off the client: the
    bot's own user id (known after login), the vote buttons' store (None
    when FEEDBACK_DB is off) and how often a streamed answer is edited.
    """

    def __init__(
        self,
        engine: Engine,
        settings: BotSettings,
        *,
        bot_user_id: int,
        feedback: DiscordFeedback | None = None,
        edit_interval_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.feedback = feedback
        self.edit_interval_s = edit_interval_s
        self.rate_limit = RateLimiter(settings.rate_limit_per_minute)
        self.chains = ReplyChains(bot_user_id, max_chars=CONTEXT_CHARS)
        self.accepting = True
        self._in_flight: dict[int, asyncio.Task[object]] = {}  # question/interaction id → task
        self._deleted: set[int] = set()

    # ---- mentions, DMs and replies -----------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot:
            return
        addressed = (
            message.guild is None
            or any(user.id == self.chains.bot_user_id for user in message.mentions)
            or self.chains.is_reply_to_bot(message)
        )
        if not addressed:
            return
        async with self._guarded(message.id, f"message {message.id}", message.reply):
            await self._answer_message(message)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A deleted question needs no answer: free its place in the batch."""
        task = self._in_flight.get(payload.message_id)
        if task is not None:
            self._deleted.add(payload.message_id)
            task.cancel()

    async def _answer_message(self, message: discord.Message) -> None:
        question = strip_mentions_of(message.content, self.chains.bot_user_id)
        refusal = self._refusal(message.author, message.channel, question)
        if refusal is not None:
            await message.reply(refusal)
            return
        await message.channel.typing()
        chain = await self.chains.chain(message)
        messages = chain_to_messages(chain, max_chars=CONTEXT_CHARS)
        target = MessageReply(message)
        waiting = self.engine.status().queue_depth
        if waiting:
            await target.show(f"⏳ Queued (#{waiting + 1}), your answer starts soon…")
        try:
            sent = await self._stream(target, messages, self._default_variant())
        except asyncio.CancelledError:
            if message.id in self._deleted and target.message is not None:
                with contextlib.suppress(discord.HTTPException):
                    await target.message.delete()
            raise
        for previous, part in zip([message, *sent[:-1]], sent, strict=True):
            self.chains.remember(
                part.id, from_bot=True, content=part.content, parent_id=previous.id
            )

    # ---- slash commands ----------------------------------------------------------------

    @app_commands.command(name="ask", description="Ask the ski bot a question")
    @app_commands.describe(
        question="Your question", model="Which model answers (default: the finetuned one)"
    )
    async def ask(
        self, interaction: discord.Interaction, question: str, model: str | None = None
    ) -> None:
        async with self._guarded(interaction.id, "/ask", _responder(interaction)):
            name = model or self._default_variant()
            refusal = self._refusal(interaction.user, interaction.channel, question) or unknown(
                self.engine.models(), name
            )
            if refusal is not None:
                await interaction.response.send_message(refusal, ephemeral=True)
                return
            await interaction.response.defer(thinking=True)
            await self._stream(InteractionReply(interaction), self._question(question), name)

    @ask.autocomplete("model")
    async def _ask_model(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return name_choices(self.engine.models(), current)

    @app_commands.command(name="compare", description="Two models' answers side by side")
    @app_commands.describe(
        question="Your question",
        a="One model (default: base)",
        b="The other model (default: the finetuned one)",
        blind="Hide which model wrote which answer until you vote",
    )
    async def compare(
        self,
        interaction: discord.Interaction,
        question: str,
        a: str = BASE,
        b: str = FINETUNED,
        blind: bool | None = None,
    ) -> None:
        async with self._guarded(interaction.id, "/compare", _responder(interaction)):
            refusal = self._refusal(interaction.user, interaction.channel, question)
            sides = comparison(
                self.engine.models(),
                a,
                b,
                blind=self.settings.compare_blind if blind is None else blind,
            )
            if refusal is not None or isinstance(sides, str):
                await interaction.response.send_message(refusal or str(sides), ephemeral=True)
                return
            await interaction.response.defer(thinking=True)  # Discord wants an ack within 3 s
            messages = self._question(question)
            live = LiveComparison(interaction, question, sides, interval_s=self.edit_interval_s)
            try:
                first, second = await self.engine.compare(
                    messages, models=sides.names, on_text=live.feed
                )
            except asyncio.CancelledError:
                await live.stop()
                if not self.accepting:  # shutting down: don't leave the user "thinking…"
                    await _try(interaction.edit_original_response(content=NOTES["cancelled"]))
                raise
            finally:
                await live.stop()
            view = None
            if self.feedback is not None and "cancelled" not in (
                first.finish_reason,
                second.finish_reason,
            ):
                view = self.feedback.pair_view_for(messages, first, second)
            await _show_comparison(interaction, question, sides, (first, second), view=view)

    @compare.autocomplete("a")
    @compare.autocomplete("b")
    async def _compare_model(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return name_choices(self.engine.models(), current)

    @app_commands.command(name="status", description="Model, queue and throughput of the bot")
    async def status(self, interaction: discord.Interaction) -> None:
        async with self._guarded(interaction.id, "/status", _responder(interaction)):
            refusal = self._not_allowed(interaction.user, interaction.channel)
            if refusal is not None:  # the allow lists cover the bot's status too
                await interaction.response.send_message(refusal, ephemeral=True)
                return
            embed = _status_embed(self.engine)
            if self.feedback is not None:
                rows = await self.feedback.status_rows(self.engine.models())
                for name, value in rows.items():
                    embed.add_field(name=name, value=_shorten(value, EMBED_FIELD_LIMIT))
            await interaction.response.send_message(embed=embed, ephemeral=True)

    # ---- shared parts ------------------------------------------------------------------

    def _question(self, question: str) -> list[Message]:
        return [{"role": "user", "content": question.strip()}]

    def _default_variant(self) -> Variant:
        """What a mention and a plain /ask are answered by: the default adapter, else the base."""
        return FINETUNED if self.engine.models().default is not None else BASE

    async def _stream(
        self, target: ReplyTarget, messages: list[Message], variant: Variant
    ) -> list[discord.Message]:
        """Stream one answer into ``target``; on shutdown, keep what was written and say so."""
        live = LiveText(target, interval_s=self.edit_interval_s)
        try:
            answer = await self.engine.generate(messages, variant=variant, on_text=live.feed)
        except EngineError as exc:  # busy, timed out…: said where the answer would have been
            log.info("answer not given: %s", exc)
            await live.stop()
            await target.finish([f"⚠️ {exc}"])
            return []  # nothing for the reply chain to remember
        except asyncio.CancelledError:
            await live.stop()
            if not self.accepting:  # shutting down: keep what was written, and say why it ends
                if live.text.strip():
                    await _try(live.finish(live.text, note=NOTES["cancelled"]))
                else:
                    await _try(target.finish([NOTES["cancelled"]]))
            raise
        finally:
            await live.stop()
        view = None
        if self.feedback is not None and answer.finish_reason != "cancelled":
            view = self.feedback.answer_view_for(messages, answer)
        return await live.finish(
            answer.text,
            note=NOTES.get(answer.finish_reason, ""),
            view=view,
            sources=sources_block(answer.sources),
        )

    def _refusal(
        self,
        user: discord.User | discord.Member,
        channel: object,
        question: str,
    ) -> str | None:
        """Why this question is not answered (a polite sentence), or None to answer it."""
        if not self.accepting:
            return "I'm restarting right now: ask again in a minute."
        refusal = self._not_allowed(user, channel)
        if refusal is not None:
            return refusal
        if not question.strip():
            return "Ask me a ski question: mention me followed by your question."
        limit = self.settings.max_question_chars
        if len(question) > limit:
            return (
                f"That question is {len(question)} characters long; please keep it under {limit}."
            )
        wait_s = self.rate_limit.acquire(user.id)
        if wait_s is not None:
            per_minute = self.settings.rate_limit_per_minute
            return (
                f"Easy there: {per_minute} questions a minute at most. "
                f"Try again in {math.ceil(wait_s)} s."
            )
        return None

    def _not_allowed(self, user: discord.User | discord.Member, channel: object) -> str | None:
        """Why the allow lists (ALLOWED_CHANNEL_IDS, ALLOWED_ROLE_IDS) keep this user out, or None."""
        allowed_channels = self.settings.allowed_channel_ids
        if allowed_channels and isinstance(channel, discord.abc.GuildChannel | discord.Thread):
            channel_ids = {channel.id, getattr(channel, "parent_id", None)}
            if not channel_ids & set(allowed_channels):
                places = ", ".join(f"<#{c}>" for c in allowed_channels)
                return f"I only answer in {places}."
        allowed_roles = self.settings.allowed_role_ids
        if allowed_roles:
            roles = {role.id for role in getattr(user, "roles", [])}
            if not roles & set(allowed_roles):
                return "Sorry, only members with one of the bot's allowed roles can ask me."
        return None

    @contextlib.asynccontextmanager
    async def _guarded(
        self, key: int, context: str, respond: Callable[[str], Awaitable[object]]
    ) -> AsyncIterator[None]:
        """Track the handler for shutdown and deletion; turn failures into a short user message."""
        task = asyncio.current_task()
        if task is not None:
            self._in_flight[key] = task
        try:
            yield
        except EngineError as exc:  # expected: busy, timed out, unavailable…
            log.info("%s: %s", context, exc)
            await _try(respond(f"⚠️ {exc}"))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", context)
            await _try(respond(SORRY))
        finally:
            self._in_flight.pop(key, None)
            self._deleted.discard(key)

    async def drain(self, grace_s: float) -> None:
        """Take no new questions, give running answers ``grace_s`` to finish, stop the rest."""
        self.accepting = False
        tasks = [t for t in self._in_flight.values() if not t.done()]
        if not tasks:
            return
        log.info("waiting up to %.0f s for %d answers to finish", grace_s, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)


def _responder(interaction: discord.Interaction) -> Callable[[str], Awaitable[object]]:
    """Send a short message to the user, whether or not the interaction was answered yet."""

    async def respond(text: str) -> object:
        if interaction.response.is_done():
            return await interaction.edit_original_response(content=text, embed=None)
        return await interaction.response.send_message(text, ephemeral=True)

    return respond


async def _try(message: Awaitable[object]) -> None:
    try:
        await message
    except discord.HTTPException as exc:
        log.warning("could not tell the user about a failure: %s", exc)


class LiveComparison:
    """Both answers of a ``/compare`` shown side by side while they are written.

    The engine writes the two answers at once, so they fill the embed the
    final comparison will have, marked as still being written; the response
    is edited at most once per ``interval_s`` whichever answer moved, as
    Discord rate-limits edits.
    """

    def __init__(
        self,
        interaction: discord.Interaction,
        question: str,
        sides: Sides,
        *,
        interval_s: float = 1.0,
    ) -> None:
        self.interaction = interaction
        self.question = question
        self.labels = dict(zip(sides.names, sides.labels, strict=True))
        self.texts: dict[Variant, str] = dict.fromkeys(sides.names, "")
        self._edits = ThrottledEdits(self._show, interval_s=interval_s)

    def feed(self, variant: Variant, delta: str) -> None:
        """Add streamed text of one answer; called on the event loop, never blocks."""
        self.texts[variant] += delta
        self._edits.changed()

    def embed(self) -> discord.Embed:
        room = EMBED_FIELD_LIMIT - len(STREAMING_MARK)
        embed = discord.Embed(title=_shorten(self.question, 256), colour=discord.Colour.blue())
        for name, text in self.texts.items():
            embed.add_field(
                name=self.labels[name],
                value=(text.strip()[:room] + STREAMING_MARK).strip(),
                inline=True,
            )
        return embed

    async def _show(self) -> None:
        await self.interaction.edit_original_response(embed=self.embed())

    async def stop(self) -> None:
        """Stop previewing for good (before the final comparison replaces the preview)."""
        await self._edits.stop()


async def _show_comparison(
    interaction: discord.Interaction,
    question: str,
    sides: Sides,
    answers: tuple[Answer, Answer],
    *,
    view: discord.ui.View | None = None,
) -> None:
    """One embed with the two answers side by side when they fit, else two labelled parts.

    Side A first, each under its label (its model's name, or only "A"/"B"
    when blind). ``view`` (the preference buttons) goes under the last part.
    """
    texts = {
        label: answer.text.strip() or "_(empty answer)_"
        for label, answer in zip(sides.labels, answers, strict=True)
    }
    sources = sources_block(answers[0].sources or answers[1].sources)  # the same: shown once
    if all(len(text) <= EMBED_FIELD_LIMIT for text in texts.values()):
        embed = discord.Embed(title=_shorten(question, 256), colour=discord.Colour.blue())
        for label, text in texts.items():
            embed.add_field(name=label, value=text, inline=True)
        await interaction.edit_original_response(
            content=sources or discord.utils.MISSING, embed=embed, view=view_here(view)
        )
        return
    parts = [p for label, text in texts.items() for p in split_message(f"**{label}**\n{text}")]
    parts = with_sources(parts, sources)
    # embed=None: no streamed preview is left above the parts
    await interaction.edit_original_response(
        content=parts[0], embed=None, view=view_here(view, here=len(parts) == 1)
    )
    for number, part in enumerate(parts[1:], start=2):
        await interaction.followup.send(part, view=view_here(view, here=number == len(parts)))


def _status_embed(engine: Engine) -> discord.Embed:
    status = engine.status()
    embed = discord.Embed(title="Freeski bot status", colour=discord.Colour.green())
    rows = {
        "Model": status.model,
        "Adapters": _adapters_line(engine.models()),
        "Backend": f"{status.backend} on {status.device}",
        "Ready": "yes" if status.ready else "loading…",
        "Queue": f"{status.queue_depth}/{status.queue_size} waiting, batches of up to {status.max_batch}",
        "Served": f"{status.requests_served} answers in {status.batches_served} batches",
        "Throughput": f"{status.tokens_per_s:.1f} tokens/s ({status.tokens_generated} tokens in all)",
        "Uptime": _duration(status.uptime_s),
        "Grounding": status.grounding,
    }
    for name, value in rows.items():
        embed.add_field(name=name, value=_shorten(value, EMBED_FIELD_LIMIT), inline=True)
    return embed


def _adapters_line(served: ServedModels) -> str:
    """``v1 1a2b3c4d, v2 5e6f7a8b (default)``: each served adapter, its short hash, the default."""
    if not served.adapters:
        return "none (base only)"
    return ", ".join(
        f"{a.name}"
        + (f" `{a.weights_hash[:8]}`" if a.weights_hash else "")
        + (" (default)" if a.name == served.default else "")
        for a in served.adapters
    )


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
