"""Which model the community prefers: 👍/👎 per model, head-to-head results, a ranking.

Pure functions over what the store counts (:class:`ModelVotes`,
:class:`PairTally`), so the statistics can be checked by hand and the
front ends (``/status``, the CLI) only render.

How votes count, everywhere here and in :class:`FeedbackSummary`:

- A model is a served name and the weights behind it (:class:`ModelRef`):
  ``v2`` re-pointed at retrained weights is a new entry.
- Every voter's choice on a pair is one comparison. A tie is half a win for
  each side. "Both bad" says neither answer was acceptable, not which was
  better: it is counted and shown, but left out of win rates and the ranking
  (as the DPO export leaves it out).
- Intervals are 95 % Wilson score intervals, which stay inside [0, 1] and
  behave with few votes. They treat votes as independent, which they are not
  quite (one voter judges many pairs): read them as a lower bound on the
  uncertainty.
- The ranking is a Bradley–Terry fit by Hunter's (2004) MM algorithm over
  every comparison. A weak prior (:data:`PRIOR_GAMES` virtual comparisons of
  each model against a reference of strength 1, half won) keeps a model with
  no losses (or no wins) finite and ranks models that never met each other
  on one scale. Ratings are on the Elo scale: 1000 is the reference, and
  400 points more means 10:1 odds of being preferred.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot.feedback.records import ModelRef, ModelVotes, PairTally

if TYPE_CHECKING:
    from bot.feedback.store import FeedbackStore

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile
PRIOR_GAMES = 1.0
BASE = "base"


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson(successes: float, n: float, z: float = Z_95) -> Interval | None:
    """The Wilson score interval of ``successes`` out of ``n`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Standing:
    """One model's answers and how they were rated."""

    model: ModelRef
    answers: int
    up: int
    down: int

    @property
    def up_rate(self) -> float | None:
        rated = self.up + self.down
        return self.up / rated if rated else None

    @property
    def up_interval(self) -> Interval | None:
        return wilson(self.up, self.up + self.down)


@dataclass(frozen=True)
class HeadToHead:
    """Every comparison of ``model`` with ``opponent``, from ``model``'s side."""

    model: ModelRef
    opponent: ModelRef
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def votes(self) -> int:
        """Every vote on these pairs, "both bad" included."""
        return self.wins + self.losses + self.ties + self.both_bad

    @property
    def decided(self) -> int:
        """The votes the win rate is over: wins, losses and ties."""
        return self.wins + self.losses + self.ties

    @property
    def score(self) -> float:
        """Wins, a tie counting half."""
        return self.wins + self.ties / 2

    @property
    def win_rate(self) -> float | None:
        return self.score / self.decided if self.decided else None

    @property
    def interval(self) -> Interval | None:
        return wilson(self.score, self.decided)

    def flipped(self) -> HeadToHead:
        return HeadToHead(
            self.opponent, self.model, self.losses, self.wins, self.ties, self.both_bad
        )


@dataclass(frozen=True)
class Rated:
    """A model's place in the Bradley–Terry ranking."""

    model: ModelRef
    strength: float
    comparisons: int  # decided comparisons with other models (the prior's are not counted)

    @property
    def rating(self) -> float:
        return 1000 + 400 * math.log10(self.strength)


@dataclass(frozen=True)
class Leaderboard:
    standings: list[Standing]  # by name, then weights
    head_to_heads: list[HeadToHead]  # each pair once, the better-ranked model first
    ranking: list[Rated]  # best first; only models with at least one decided comparison

    def against_base(self) -> list[HeadToHead]:
        """Each model's results against ``base``, from the model's side (for ``/status``)."""
        return [
            h.flipped() if h.model.name == BASE else h
            for h in self.head_to_heads
            if BASE in (h.model.name, h.opponent.name) and h.model.name != h.opponent.name
        ]

    def against_base_of(self, served: Mapping[str, str | None]) -> dict[str, HeadToHead]:
        """The results against ``base`` of the weights served now, by served name.

        ``served`` maps each adapter's name to its weights hash; an earlier
        adapter under the same name is another entry and is left out. A hash
        of None (weights a remote server holds) takes the name's entry with
        the most votes.
        """
        rows: dict[str, HeadToHead] = {}
        for h in self.against_base():
            name = h.model.name
            if name not in served or served[name] not in (None, h.model.weights):
                continue
            if name not in rows or h.votes > rows[name].votes:
                rows[name] = h
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "counting": {
                "ties": "half a win for each side",
                "both_bad": "shown, left out of win rates and the ranking",
                "interval": "95% Wilson score",
                "ranking": f"Bradley-Terry (MM), prior {PRIOR_GAMES:g} game(s) vs a reference "
                "model of rating 1000; Elo scale",
            },
            "models": [
                {
                    **_model_json(s.model),
                    "answers": s.answers,
                    "up": s.up,
                    "down": s.down,
                    "up_rate": s.up_rate,
                    "up_interval": _interval_json(s.up_interval),
                }
                for s in self.standings
            ],
            "pairs": [
                {
                    "model": _model_json(h.model),
                    "opponent": _model_json(h.opponent),
                    "wins": h.wins,
                    "losses": h.losses,
                    "ties": h.ties,
                    "both_bad": h.both_bad,
                    "votes": h.votes,
                    "win_rate": h.win_rate,
                    "interval": _interval_json(h.interval),
                }
                for h in self.head_to_heads
            ],
            "ranking": [
                {
                    "rank": rank,
                    **_model_json(r.model),
                    "rating": round(r.rating, 1),
                    "comparisons": r.comparisons,
                }
                for rank, r in enumerate(self.ranking, 1)
            ],
        }

    def to_text(self) -> str:
        """Three plain tables: the models, each pair of models, the ranking."""
        if not self.standings:
            return "No answers recorded yet.\n"
        models = _table(
            ("model", "answers", "up", "down", "up rate", "95% interval"),
            [
                (s.model.label, s.answers, s.up, s.down, _percent(s.up_rate), _span(s.up_interval))
                for s in self.standings
            ],
        )
        lines = ["Models (👍/👎 on single answers)", *models, ""]
        lines.append(
            "Head to head (each voter's pick on a /compare; a tie counts half a win, "
            "'both bad' is counted but not in the win rate)"
        )
        if self.head_to_heads:
            lines += _table(
                (
                    "model",
                    "vs",
                    "wins",
                    "losses",
                    "ties",
                    "both bad",
                    "votes",
                    "win rate",
                    "95% interval",
                ),
                [
                    (
                        h.model.label,
                        h.opponent.label,
                        h.wins,
                        h.losses,
                        h.ties,
                        h.both_bad,
                        h.votes,
                        _percent(h.win_rate),
                        _span(h.interval),
                    )
                    for h in self.head_to_heads
                ],
                left=2,
            )
        else:
            lines.append("  no comparisons voted on yet")
        lines += ["", "Ranking (Bradley-Terry over all pairs; Elo scale, +400 = 10:1 odds)"]
        if self.ranking:
            lines += _table(
                ("rank", "model", "rating", "decided votes"),
                [
                    (f"{n}.", r.model.label, f"{r.rating:.0f}", r.comparisons)
                    for n, r in enumerate(self.ranking, 1)
                ],
                left=2,
            )
        ranked = {r.model for r in self.ranking}
        unranked = [s.model.label for s in self.standings if s.model not in ranked]
        if unranked:
            lines.append(f"  not ranked (no decided comparison yet): {', '.join(unranked)}")
        return "\n".join(lines) + "\n"


def head_to_heads(tallies: Iterable[PairTally]) -> list[HeadToHead]:
    """One :class:`HeadToHead` per two models, whichever side each was shown on.

    Oriented by the models' order (name, then weights); pairs of one model
    with itself are dropped (the store refuses to record them).
    """
    merged: dict[tuple[ModelRef, ModelRef], HeadToHead] = {}
    for t in tallies:
        if t.a == t.b:
            continue
        h = HeadToHead(t.a, t.b, t.a_wins, t.b_wins, t.ties, t.both_bad)
        if _order(t.b) < _order(t.a):
            h = h.flipped()
        key = (h.model, h.opponent)
        if key in merged:
            m = merged[key]
            h = HeadToHead(
                h.model,
                h.opponent,
                m.wins + h.wins,
                m.losses + h.losses,
                m.ties + h.ties,
                m.both_bad + h.both_bad,
            )
        merged[key] = h
    return [merged[key] for key in sorted(merged, key=lambda k: (_order(k[0]), _order(k[1])))]


def bradley_terry(
    results: Sequence[HeadToHead],
    prior: float = PRIOR_GAMES,
    *,
    tolerance: float = 1e-10,
    max_rounds: int = 100_000,
) -> dict[ModelRef, float]:
    """Each model's Bradley–Terry strength (the reference is 1), by Hunter's MM iteration.

    Maximises, over strengths p, the sum over comparisons of
    log p_winner / (p_i + p_j), each tie adding half of each side's term,
    plus ``prior`` comparisons of every model with a fixed model of strength 1,
    half of them won. The update

        p_i ← (W_i + prior/2) / (Σ_j n_ij / (p_i + p_j) + prior / (p_i + 1))

    (W_i: i's wins, ties half; n_ij: decided comparisons of i and j) raises
    the likelihood every round and converges to its unique maximum.
    """
    if prior <= 0:
        raise ValueError("the prior must be positive, or a model with no losses has no maximum")
    wins: dict[ModelRef, float] = {}
    games: dict[ModelRef, dict[ModelRef, float]] = {}
    for h in results:
        if h.decided == 0 or h.model == h.opponent:
            continue
        sides = ((h.model, h.opponent, h.score), (h.opponent, h.model, h.decided - h.score))
        for me, other, score in sides:
            wins[me] = wins.get(me, 0.0) + score
            met = games.setdefault(me, {})
            met[other] = met.get(other, 0.0) + h.decided
    strength = dict.fromkeys(wins, 1.0)
    for _ in range(max_rounds):
        updated = {
            i: (wins[i] + prior / 2)
            / (
                sum(n / (strength[i] + strength[j]) for j, n in games[i].items())
                + prior / (strength[i] + 1)
            )
            for i in strength
        }
        change = max((abs(math.log(updated[i] / strength[i])) for i in strength), default=0.0)
        strength = updated
        if change < tolerance:
            break
    return strength


def leaderboard(
    votes: Iterable[ModelVotes], tallies: Iterable[PairTally], prior: float = PRIOR_GAMES
) -> Leaderboard:
    """The whole board from the store's counts (:meth:`FeedbackStore.leaderboard_counts`)."""
    standings = sorted(
        (Standing(v.model, v.answers, v.up, v.down) for v in votes),
        key=lambda s: _order(s.model),
    )
    pairs = head_to_heads(tallies)
    strength = bradley_terry(pairs, prior)
    decided: dict[ModelRef, int] = {}
    for h in pairs:
        for model in (h.model, h.opponent):
            decided[model] = decided.get(model, 0) + h.decided
    ranking = sorted(
        (Rated(model, p, decided[model]) for model, p in strength.items()),
        key=lambda r: (-r.strength, _order(r.model)),
    )
    place = {r.model: n for n, r in enumerate(ranking)}
    unranked = len(place)
    oriented = [
        h.flipped() if place.get(h.opponent, unranked) < place.get(h.model, unranked) else h
        for h in pairs
    ]
    oriented.sort(key=lambda h: (place.get(h.model, unranked), place.get(h.opponent, unranked)))
    return Leaderboard(standings, oriented, ranking)


def read_leaderboard(store: FeedbackStore) -> Leaderboard:
    """The board of everything in ``store``; blocking (the event loop goes through aio)."""
    return leaderboard(*store.leaderboard_counts())


def _order(model: ModelRef) -> tuple[bool, str, str]:
    """Base first, then by name and weights."""
    return (model.name != BASE, model.name, model.weights or "")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _span(interval: Interval | None) -> str:
    return "-" if interval is None else f"{interval.low:.0%}-{interval.high:.0%}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> list[str]:
    """Columns padded to their widest cell: the first ``left`` (names) to the left, numbers right."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  "
        + "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]


def _model_json(model: ModelRef) -> dict[str, Any]:
    return {"name": model.name, "weights": model.weights, "label": model.label}


def _interval_json(interval: Interval | None) -> list[float] | None:
    return None if interval is None else [interval.low, interval.high]
