"""Compare llama.cpp with transformers, token by token: shared by the export tests and benchmark.

``probe`` runs llama.cpp in a subprocess (tests/llama_cpp_probe.py) so an abort
in llama.cpp fails one check; ``reference`` is the base in float32 (with the
PEFT adapter, unmerged); ``compare`` gives the two figures the export is held
to: next-token argmax agreement, and the mean error of llama.cpp's log-prob of
the token transformers chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBE = Path(__file__).with_name("llama_cpp_probe.py")
MIN_AGREEMENT = 0.98
MAX_LOGPROB_ERROR = 0.03  # nats, on the token transformers chose
Q8_MIN_AGREEMENT = 0.90  # a random-weight model's flat logits flip argmaxes easily
Q8_MAX_LOGPROB_ERROR = 0.1

FORUM_TEXTS = [
    "Anyone skied Chamonix this week? Vallée Blanche was 🔥🔥 but the café at the top was closed 😅",
    "Check https://www.skiforum.example/t/123?page=2#post-9 — DIN 8–10 for 80 kg, façade de neige",
    "def wax(ski):\n    return ski.base.temperature < -5  # cold wax 🧊",
    "Zermatt → Cervinia: 25 km, ~1 500 m vert, naïve question: is the lift pass €89 or CHF 92?",
]
QUESTIONS = [
    ("What wax for spring snow?", "Warm wax, and scrape it well before the slush."),
    ("Are 180 cm skis too long?", "For your height they are fine if you ski fast on piste."),
    ("Best resort for powder in January?", "Go where the storms hit: Niseko or Alta."),
]


def probe(model: Path, lora: Path | None, texts=(), sequences=(), targets=()) -> dict:
    request = {
        "model": str(model),
        "lora": str(lora) if lora else None,
        "texts": list(texts),
        "sequences": [list(map(int, s)) for s in sequences],
        "targets": [list(map(int, t)) for t in targets],
    }
    done = subprocess.run(
        [sys.executable, str(PROBE)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"llama.cpp failed ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout)


@dataclass
class Reference:
    sequences: list[list[int]]
    argmax: list[np.ndarray]
    logprobs: list[np.ndarray]  # full log-softmax rows, float64


def chat_sequences(tokenizer) -> list[list[int]]:
    """Chat-formatted questions with answers, then raw forum text, tokenized as training does."""
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in QUESTIONS
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered + FORUM_TEXTS]


def reference(model_dir: Path, adapter_dir: Path | None, sequences) -> Reference:
    import torch

    from finetune.modeling import QuantOptions, load_adapter, load_base_model

    model = load_base_model(
        model_dir, quant=QuantOptions(load_in_4bit=False), device="cpu", dtype=torch.float32
    )
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    model.eval()
    argmax, logprobs = [], []
    with torch.no_grad():
        for sequence in sequences:
            logits = model(torch.tensor([sequence])).logits[0].double()
            rows = torch.log_softmax(logits, dim=-1).numpy()
            argmax.append(rows.argmax(axis=1))
            logprobs.append(rows)
    return Reference([list(s) for s in sequences], argmax, logprobs)


def compare(ref: Reference, model: Path, lora: Path | None) -> tuple[float, float]:
    """(argmax agreement, mean |log-prob error| on the reference's argmax token)."""
    got = probe(model, lora, sequences=ref.sequences, targets=[a.tolist() for a in ref.argmax])
    agree, errors = [], []
    for ours, theirs, rows, logprob in zip(
        got["argmax"], ref.argmax, ref.logprobs, got["logprobs"], strict=True
    ):
        agree.extend(np.asarray(ours) == theirs)
        errors.extend(np.abs(np.asarray(logprob) - rows[np.arange(len(theirs)), theirs]))
    return float(np.mean(agree)), float(np.mean(errors))
