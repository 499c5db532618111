"""The knowledge check: fact matching, file validation, the shipped files, and the scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.knowledge import (
    KnowledgeAnswer,
    load_knowledge,
    parse_knowledge,
    score,
    states,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    (REPO / "crawl/sample_forum/knowledge.jsonl", REPO / "crawl/sample_forum/threads.yaml"),
    (
        REPO / "benchmarks/unseen_forum/knowledge.jsonl",
        REPO / "benchmarks/unseen_forum/threads.yaml",
    ),
]


@pytest.mark.parametrize(
    ("answer", "fact", "expected"),
    [
        ("I'm 180cm tall", "180 cm", True),
        ("I'm 180 cm tall", "180cm", True),
        ("Lights run until 9.30 PM", "9:30", True),
        ("The night ticket is $39.", "39 dollars", False),  # "dollars" is not written
        ("The night ticket is $39.", "39", True),
        ("the pass is 349", ["349 dollars", "349"], True),
        ("it has 120 spots", "12", False),  # whole numbers only
        ("ask at EDGEWORKS, in Harlow", "Edgeworks", True),
        ("go to the Edgeworkshop", "Edgeworks", False),  # whole words only
        ("the skier’s left side", "skier's left", True),  # curly apostrophe
        ("a 10,000 mm rating", "10000", True),
        ("somewhere between four and six days", ["4 to 6", "four to six"], False),
        ("four to six days", ["4 to 6", "four to six"], True),
    ],
)
def test_states_matches_spellings_whole_words_normalised(answer, fact, expected):
    assert states(answer, fact) is expected


def line(**item) -> str:
    return json.dumps(item)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "k.jsonl:2: not JSON"),
        ('["a list"]', "k.jsonl:2: each line must be a JSON object"),
        (line(question="Q?", facts=["x"]), "k.jsonl:2: missing 'thread_id'"),
        (line(question="Q?", facts=["x"], thread_id=7), "k.jsonl:2: 'thread_id' must be"),
        (line(question=" ", facts=["x"], thread_id="7"), "k.jsonl:2: 'question' must be"),
        (line(question="Q?", facts=[], thread_id="7"), "k.jsonl:2: 'facts' must be a non-empty"),
        (line(question="Q?", facts=[[]], thread_id="7"), "k.jsonl:2: a fact must be"),
        (line(question="Q?", facts=[["a", 3]], thread_id="7"), "k.jsonl:2: fact spelling 3"),
        (line(question="Q?", facts=["?!"], thread_id="7"), "no letters or digits"),
        (line(question="Q?", facts=["x"], thread_id="7", url="u"), "unknown key 'url'"),
        (
            line(question="First?", facts=["y"], thread_id="8"),
            "k.jsonl:2: the same question as line 1",
        ),
    ],
)
def test_a_bad_line_is_one_error_naming_file_line_and_what(text, message):
    first = line(question="First?", facts=["x", ["y", "z"]], thread_id="7")
    with pytest.raises(UserError, match=None) as raised:
        parse_knowledge([first, text], "k.jsonl")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_or_empty_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_knowledge(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no questions"):
        load_knowledge(tmp_path / "empty.jsonl")


@pytest.mark.parametrize(("knowledge", "forum"), SHIPPED, ids=["sample", "unseen"])
def test_every_shipped_question_is_answered_by_its_thread_in_other_words(knowledge, forum):
    questions = load_knowledge(knowledge)
    threads = {str(t["id"]): t for t in yaml.safe_load(forum.read_text())["threads"]}
    assert len(questions) >= 20
    for item in questions:
        thread = threads[item.thread_id]
        replies = " ".join(p["text"] for p in thread["posts"][1:] if not p.get("deleted"))
        missing = [fact for fact in item.facts if not states(replies, fact)]
        assert not missing, (item.question, missing)
        assert thread["title"].lower() not in item.question.lower()  # paraphrased


def test_score_counts_stated_reached_and_recall():
    [item] = parse_knowledge([line(question="Q?", facts=["39", "Bobcat"], thread_id="7")], "k")
    answers = [
        KnowledgeAnswer("Q?", "7", "base", False, "39 on the Bobcat"),
        KnowledgeAnswer(
            "Q?", "7", "base", True, "It is 39.", ("8", "7"), ("lit: the Bobcat triple",)
        ),
        KnowledgeAnswer("Q?", "7", "finetuned", True, "No idea.", ("8",), ("nothing here",)),
    ]
    shares = {(s.model, s.grounded): s for s in score([item], answers)}
    assert set(shares) == {("base", False), ("base", True), ("finetuned", True)}
    assert (shares["base", False].stated, shares["base", False].reached) == (1, 1)
    assert shares["base", False].recall is None
    assert (shares["base", True].stated, shares["base", True].reached) == (0, 1)
    assert shares["base", True].recall == 1
    assert (shares["finetuned", True].reached, shares["finetuned", True].recall) == (0, 0)
