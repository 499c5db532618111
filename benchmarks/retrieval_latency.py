"""Retrieval latency on a synthetic forum of a million posts (issue 19: p95 under 50 ms).

Grounding runs one search per answer, so the search must stay cheap when the
forum is large. This builds a store with the real schema (``Store.open``)
and fills it in bulk — threads, posts, post keys and passages, the passages'
insert trigger filling the FTS5 index — from a fixed-seed ski vocabulary:
a few thousand words with a Zipf-like distribution (function words first,
then forum words, then a long tail of made-up model and place names), and
per thread a couple of rare invented words and numbers that stand for the
facts a question asks about. ~10 posts a thread; the opening post is the
question, the replies are the passages.

The store is cached (``--store``; rebuilt only when missing or with
``--rebuild``): building a million posts takes minutes on two shared cores.
Then ``--queries`` questions of 8–25 words (some with FTS syntax, some long
pastes, most naming a thread's fact) go through ``Retriever.search(q, k=3)``
after a warm-up, with a warm page cache, and again after asking the kernel
to drop the file's cached pages (cold-ish: pages other processes map stay).

Not a test: nothing is asserted. Prints the figures and, as its last line,
JSON: {"posts", "passages", "store_mb", "build_s", "p50_ms", "p95_ms", "p99_ms",
"max_ms", the same as "cpu_…" (CPU time: the wait on an idle machine), "qps",
"fact_thread_found" (the share of questions naming a thread's fact whose top k
hold that thread), "cold": {...}, "goal_p95_ms": 50, "met", "met_cpu"}.

    nice python benchmarks/retrieval_latency.py [--posts 1000000] [--queries 500]
        [--store .cache/bench/retrieval-1m.sqlite] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crawl.rules import text_key  # noqa: E402
from crawl.search import Retriever  # noqa: E402
from crawl.store import Store  # noqa: E402

SEED = 19
GOAL_P95_MS = 50.0
POSTS_PER_THREAD = 10  # on average: 1 opening post and ~9 replies
THREADS_PER_TRANSACTION = 5_000
WARMUP = 50
HOST = "https://forum.example"

# The words every post is made of, most frequent first (the order is the Zipf rank).
FUNCTION_WORDS = """the i to a and it you is of for in that on my but with be if this have
    are just was so at not they skis ski or like get do your can what all me would
    about one more from up as out when some an think will no good also had really
    much been there them any we then than how which because other too only know did
    over still even into could most pretty well should time lol got way go going
    make new those these its where why who very now here off back same after first
    say said try tried thing things need want maybe though around again each many
    does something anyone someone never always""".split()  # noqa: SIM905 (a word list reads better as text)
SKI_WORDS = """snow powder pow groomers groomer park pipe jump jumps rail rails box
    boxes trees glades moguls bumps steeps chute chutes couloir backcountry sidecountry
    touring skins skin bindings binding boots boot liner liners shell flex stiff soft
    playful damp stable chatter edge edges base bases wax waxing tune tuning ptex
    core cores rocker camber tip tail tips tails waist width length mount mounted
    mounting center forward setback sidecut radius turn turns carve carving carver
    slash smear butter butters press presses spin spins grab grabs switch landing
    landings takeoff lip knuckle booter kicker step down jib jibbing jibber street
    urban ledge handrail kink rainbow tube wallride resort resorts mountain mountains
    hill hills lift lifts chair chairlift gondola tram pass passes ticket tickets
    epic ikon season seasons opening closing spring summer winter fall storm
    storms dump inches inch cm centimeters feet meters vertical acres terrain
    runs run trail trails black blue green double diamond expert beginner
    intermediate advanced lesson lessons instructor coach camp camps comp comps
    competition contest slopestyle halfpipe big air freeride freestyle freeskiing
    touring uphill avalanche avy beacon probe shovel airbag pack packs helmet
    goggles goggle lens lenses gloves mittens jacket pants shell insulated layer
    layers baselayer socks sock fit fitting fitter bootfitter heel hold toe box
    instep ankle shin bang calves knee knees acl injury injured broke broken
    torn surgery recovery physio rehab sprain wrist shoulder back hurt pain
    price cheap expensive deal deals sale used buy bought sell selling shop
    shops online demo demos rental rent rented brand brands model models
    line armada volkl k2 atomic salomon rossignol faction dynastar blizzard
    nordica head elan fischer tecnica lange dalbello full tilt marker look tyrolia
    shift pivot griffon jester attack squire duke kingpin tecton pin tech
    bent chetler mantra enforcer sick day bandit arg tst pescado kartel sakana
    rage hellbent sir francis bacon chronic magnum blend tom wallisch pro
    whitewalls invictus honey badger pandora wrapper legit spectrum photon
    tahoe utah colorado vermont whistler jackson alta snowbird mammoth breck
    keystone vail aspen park city baker revelstoke niseko chamonix verbier
    laax mayrhofer zermatt tignes hintertux saas fee mt hood timberline
    weather forecast temps temperature cold warm ice icy crust slush slushy
    corn wind windy hardpack packed firm fresh tracks tracked chopped crud
    groomed sticky wet dry light deep bottomless face shots tree well
    friends crew buddy buddies homie bro dude parents school college job work
    weekend weekends days day trip trips drive driving flight flying fly
    bag bags travel hostel condo lodge parking lot ride rides edit edits
    video videos film filming camera gopro shot shots clip clips song music
    instagram youtube movie movies segment part parts sponsor sponsored team
    athlete athletes rider riders skier skiers snowboarder snowboarders
    style steez tweak tweaked poke poked rotation rotations flat flatspin
    cork corked misty rodeo bio cab alley oop dub double triple 180 360 540
    720 900 1080 1260 1440 1620 backflip frontflip flip flips lincoln loop
    safety nose mute japan critical octo tail blunt truck driver stale fish
    lead tip tail screamin seamen swap swaps lap laps line lines stomp stomped
    clean sketchy huck hucked send sent sending scared fear confidence
    progression progress learn learning learned practice trampoline tramp
    water ramp airbag dryslope indoor dome snowdome glacier hike hiked
    bootpack ridge peak summit bowl bowls cliff cliffs drop drops air airs
    width 88 90 92 96 98 100 102 104 106 108 110 112 115 116 120 164 170
    172 174 176 178 180 182 184 186 188 190 192 mondo 25 26 27 28 29 30
    din 8 9 10 11 12 13 14 16 18 weight lbs kg tall height stance wide
    narrow durable durability delam delaminated core shot crack cracked
    warranty return returns replace replaced repair repaired grind stone
    file files edge tool tools iron scraper brush structure bevel degree
    degrees base edge sharp dull rust rusted storage summer store stored""".split()  # noqa: SIM905 (a word list reads better as text)
SYLLABLES = """ka ri to ve lo mar sen dri fa no pel qua zin tor bel vik sta
    ran gul mo tes ar ex ly fen dor sul kro bar mi ne os tra hil gri pa""".split()  # noqa: SIM905 (a word list reads better as text)
OPENERS = [
    "what do you guys think about",
    "how do i",
    "is it worth getting",
    "anyone know if",
    "which is better for",
    "looking for advice on",
    "help me choose between",
    "does anyone have experience with",
    "what is the best way to",
    "should i buy",
]
FTS_NOISE = ['"', "*", " NEAR ", ":", " -", "(", ")", " AND ", " OR ", " NOT ", "^", "'"]


class Vocabulary:
    """Words by Zipf rank, and a sampler: ``p(rank r) ∝ 1 / r**s``."""

    def __init__(self, rng: random.Random, size: int = 4000, exponent: float = 1.07) -> None:
        words = list(dict.fromkeys(FUNCTION_WORDS + SKI_WORDS))
        invented: set[str] = set(words)
        while len(words) < size:  # the long tail: brand, model and place names nobody repeats
            word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
            if word not in invented:
                invented.add(word)
                words.append(word)
        self.words = words
        weights = [1.0 / (rank**exponent) for rank in range(1, size + 1)]
        # A lookup table turns weighted sampling into one uniform pick per word.
        table_size = 1 << 20
        total = sum(weights)
        self._table: list[str] = []
        for word, weight in zip(words, weights, strict=True):
            self._table.extend([word] * max(1, round(weight / total * table_size)))
        function = set(FUNCTION_WORDS)
        self._content = [w for w in self._table if w not in function]

    def sample(self, rng: random.Random, n: int) -> list[str]:
        return rng.choices(self._table, k=n)

    def content(self, rng: random.Random, n: int) -> list[str]:
        """Words that a title or a search would carry: the Zipf tail without function words."""
        return rng.choices(self._content, k=n)


def invented_fact(rng: random.Random) -> str:
    """A word or number that only a few threads say: what a question is really about."""
    if rng.random() < 0.5:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(3, 4))) + rng.choice(
            ("", "x", "on", "ik")
        )
    return rng.choice(("", "", "v")) + str(rng.randint(100, 99_999)) + rng.choice(("", "cm", "mm"))


def sentences(words: list[str], rng: random.Random) -> str:
    """Words as a post's sentences: a full stop every 6–14 words, capital letters after it."""
    out: list[str] = []
    i = 0
    while i < len(words):
        n = rng.randint(6, 14)
        chunk = words[i : i + n]
        out.append(
            chunk[0].capitalize() + " " + " ".join(chunk[1:]) + rng.choice((".", ".", "!", "?"))
        )
        i += n
    return " ".join(out)


def generate(
    posts: int, rng: random.Random, vocab: Vocabulary
) -> Iterator[tuple[tuple, list[tuple], list[str]]]:
    """Threads one by one: (thread row, its post rows, its facts)."""
    thread_count = max(1, posts // POSTS_PER_THREAD)
    made = 0
    spam = "Cheap skis and goggles at our shop, best deal online, visit now for the sale."
    for t in range(thread_count):
        thread_id = str(100_000 + t)
        remaining = posts - made
        left = thread_count - t
        n = remaining if left == 1 else max(2, min(remaining - 2 * (left - 1), rng.randint(2, 18)))
        facts = [invented_fact(rng) for _ in range(2)]
        title_words = [*vocab.content(rng, rng.randint(4, 9)), facts[0]]
        rng.shuffle(title_words)
        title = " ".join(title_words).capitalize()
        slug = "-".join(title_words[:6])
        url = f"{HOST}/forum/topic/{thread_id}/{slug}"
        created = (
            f"20{rng.randint(12, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00"
        )
        thread = (
            thread_id,
            "forum/1/Ski-Gabber",
            t + 1,
            title,
            url,
            url,
            "user" + str(rng.randint(1, 50_000)),
            created,
            1,
        )
        fact_posts = {0, rng.randint(1, n - 1)}
        rows = []
        for position in range(1, n + 1):
            words = vocab.sample(rng, rng.randint(20, 80))
            if position - 1 in fact_posts:
                for fact in facts:
                    words.insert(rng.randrange(len(words) + 1), fact)
            text = spam if position > 1 and rng.random() < 0.002 else sentences(words, rng)
            post_id = str(10_000_000 + made + position - 1)
            rows.append(
                (post_id, thread_id, position, "user" + str(rng.randint(1, 50_000)), created, text)
            )
        made += n
        yield thread, rows, facts


def build(path: Path, posts: int) -> None:
    """Write the synthetic store at ``path`` (through a partial file, renamed when complete)."""
    rng = random.Random(SEED)
    vocab = Vocabulary(rng)
    partial = path.with_name(path.name + ".partial")
    for stale in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        stale.unlink(missing_ok=True)
    Store.open(partial).close()  # the real schema, triggers and all
    db = sqlite3.connect(partial, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")  # bulk load: no WAL growing by a whole transaction
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-262144")  # 256 MiB
    threads: list[tuple] = []
    post_rows: list[tuple] = []
    key_rows: list[tuple] = []
    passages: list[tuple] = []
    written = 0
    started = time.perf_counter()

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(
            """INSERT INTO threads(id, forum, rank, title, url, listing_url, author, created,
                                   page_count, state, indexed)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'done', 1)""",
            threads,
        )
        db.executemany(
            """INSERT INTO posts(id, thread_id, page, position, author, created, html, text)
               VALUES (?, ?, 1, ?, ?, ?, ?, ?)""",
            post_rows,
        )
        db.executemany(
            "INSERT INTO post_keys(post_id, thread_id, text_key) VALUES (?, ?, ?)", key_rows
        )
        db.executemany(
            """INSERT INTO passages(post_id, thread_id, title, text, author, created, url, text_key)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            passages,
        )
        db.execute("COMMIT")
        for rows in (threads, post_rows, key_rows, passages):
            rows.clear()

    for thread, rows, _facts in generate(posts, rng, vocab):
        threads.append(thread)
        thread_id, title, url = thread[0], thread[3], thread[4]
        for post_id, _, position, author, created, text in rows:
            key = text_key(text)
            post_rows.append(
                (
                    post_id,
                    thread_id,
                    position,
                    author,
                    created,
                    f'<div class="post"><p>{text}</p></div>',
                    text,
                )
            )
            key_rows.append((post_id, thread_id, key))
            if position > 1:
                passages.append(
                    (post_id, thread_id, title, text, author, created, f"{url}#post-{post_id}", key)
                )
        written += len(rows)
        if len(threads) >= THREADS_PER_TRANSACTION:
            flush()
            rate = written / (time.perf_counter() - started)
            print(f"  {written:>9,} posts  {rate:,.0f} posts/s", file=sys.stderr, flush=True)
    if threads:
        flush()
    seconds = round(time.perf_counter() - started, 1)
    db.execute("INSERT INTO meta(key, value) VALUES ('bench_build_seconds', ?)", (str(seconds),))
    db.execute("PRAGMA journal_mode=WAL")  # as the crawl leaves it
    db.close()
    os.replace(partial, path)


def questions(db: sqlite3.Connection, count: int) -> list[tuple[str, str | None]]:
    """The benchmark's questions, the same for every run on the same store.

    Most are about a random thread: a few words of its title and its fact (the
    title's word that is not in the vocabulary), as a user asking about a
    particular ski or place would; each comes with that thread's id (None for
    the others), to check that a faster search still finds it.
    """
    rng = random.Random(SEED + 1)
    vocab = Vocabulary(random.Random(SEED))  # the same words, in the same order, as the store
    common = set(vocab.words)
    threads = db.execute("SELECT COUNT(*) FROM threads").fetchone()[0]
    out: list[tuple[str, str | None]] = []
    for _ in range(count):
        if rng.random() < 0.05:  # a long paste: a whole post and more as the question
            out.append((sentences(vocab.sample(rng, rng.randint(150, 400)), rng), None))
            continue
        words = vocab.sample(rng, rng.randint(2, 8))
        about = None
        if rng.random() < 0.7:  # about a thread: a few of its title's words and its fact
            about, title = db.execute(
                "SELECT id, title FROM threads WHERE rank = ?", (rng.randint(1, threads),)
            ).fetchone()
            said = title.casefold().split()
            facts = [w for w in said if w not in common] or said
            words += [*rng.sample(said, rng.randint(1, min(4, len(said)))), rng.choice(facts)]
            words += vocab.content(rng, rng.randint(0, 3))
        else:
            words += vocab.content(rng, rng.randint(2, 8))
        rng.shuffle(words)
        words = rng.choice(OPENERS).split() + words
        words = words[:25]
        while len(words) < 8:
            words += vocab.content(rng, 1)
        text = " ".join(words) + "?"
        if rng.random() < 0.15:  # what a user may type: quotes, stars, NEAR, colons, brackets
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(text) + 1)
                text = text[:at] + rng.choice(FTS_NOISE) + text[at:]
        out.append((text, about))
    return out


def drop_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (no root needed); False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def measure(
    path: Path, asked: list[tuple[str, str | None]], k: int, warmup: int
) -> dict[str, float]:
    """Latency of ``Retriever.search`` per question, on a fresh retriever.

    Wall time is what a user waits; CPU time is that wait on an idle machine
    (the two differ by the machine's other load and, when cold, by disk reads).
    """
    with Retriever.open(path) as retriever:
        for question, _ in asked[:warmup]:
            retriever.search(question, k)
        wall: list[float] = []
        cpu: list[float] = []
        hits = about = 0
        started = time.perf_counter()
        for question, thread_id in asked:
            t0, c0 = time.perf_counter(), time.process_time()
            found = retriever.search(question, k)
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            if thread_id is not None:
                about += 1
                hits += any(p.thread_id == thread_id for p in found)
        elapsed = time.perf_counter() - started
    return {
        "queries": len(asked),
        **percentiles(wall, ""),
        **percentiles(cpu, "cpu_"),
        "qps": round(len(asked) / elapsed, 1),
        "fact_thread_found": round(hits / about, 3) if about else None,
    }


def percentiles(times: list[float], prefix: str) -> dict[str, float]:
    ordered = sorted(times)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

    return {
        f"{prefix}p50_ms": round(statistics.median(ordered), 2),
        f"{prefix}p95_ms": at(95),
        f"{prefix}p99_ms": at(99),
        f"{prefix}max_ms": round(ordered[-1], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1_000_000, help="posts in the store")
    parser.add_argument("--queries", type=int, default=500, help="questions to time")
    parser.add_argument("--k", type=int, default=3, help="passages per search")
    parser.add_argument(
        "--store",
        type=Path,
        default=ROOT / ".cache" / "bench" / "retrieval-1m.sqlite",
        help="where the synthetic store is cached",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the store even if cached")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold page-cache pass")
    args = parser.parse_args()
    if args.posts < 2 or args.queries < 1:
        parser.error("--posts must be at least 2 and --queries at least 1")

    path: Path = args.store
    path.parent.mkdir(parents=True, exist_ok=True)
    rebuilt = args.rebuild or not path.is_file()
    if rebuilt:
        print(f"building {path} with {args.posts:,} posts …", file=sys.stderr, flush=True)
        build(path, args.posts)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    row = db.execute("SELECT value FROM meta WHERE key = 'bench_build_seconds'").fetchone()
    built_s = float(row[0]) if row else None
    posts = db.execute("SELECT COUNT(*) FROM posts").fetchone()[0]
    passages = db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
    threads = db.execute("SELECT COUNT(*) FROM threads").fetchone()[0]
    asked = questions(db, args.queries)
    db.close()
    if posts != args.posts:
        print(
            f"note: {path} holds {posts:,} posts, not --posts {args.posts:,}: "
            "pass --rebuild to build it again at that size",
            file=sys.stderr,
        )
    size_mb = round(path.stat().st_size / 2**20, 1)
    built = f"built in {built_s} s" + ("" if rebuilt else ", cached")
    print(
        f"store: {posts:,} posts, {passages:,} passages, {threads:,} threads, {size_mb} MiB ({built})"
    )
    print(f"sqlite {sqlite3.sqlite_version}; {len(asked)} questions, k={args.k}, warm-up {WARMUP}")

    warm = measure(path, asked, args.k, WARMUP)
    print("warm: " + "  ".join(f"{key} {value}" for key, value in warm.items()))
    cold = None
    if not args.no_cold and drop_cache(path):
        cold = measure(path, asked, args.k, 0)
        print("cold: " + "  ".join(f"{key} {value}" for key, value in cold.items()))
    result = {
        "posts": posts,
        "passages": passages,
        "threads": threads,
        "store_mb": size_mb,
        "build_s": built_s,
        "k": args.k,
        **warm,
        "cold": cold,
        "goal_p95_ms": GOAL_P95_MS,
        "met": warm["p95_ms"] < GOAL_P95_MS,
        "met_cpu": warm["cpu_p95_ms"] < GOAL_P95_MS,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
