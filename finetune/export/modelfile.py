"""Ollama's Modelfile and the README for an export directory.

Ollama formats prompts with a Go template, not the Jinja chat template in the
GGUF, so the Modelfile needs an equivalent one. It is derived the way
:mod:`finetune.chat` reads a template: render probe conversations with the
run's own tokenizer and cut out what surrounds each turn (the opening of a
user turn, what follows it, the end of an answer, where a system message
goes). Any template that wraps turns in fixed text (Mistral, ChatML, Llama 3)
comes out right without naming the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_Q1, _A1, _Q2, _SYS = "QPROBEONE", "APROBEONE", "QPROBETWO", "SPROBESYS"


@dataclass(frozen=True)
class TurnText:
    """The fixed text around turns, as one chat template writes it."""

    bos: str  # written once before the first turn: the BOS llama.cpp does not add itself
    user_open: str
    user_close: str  # between a question and the answer that follows it
    generation: str  # after the last question: the opening of the answer to write
    answer_close: str
    system_open: str | None  # None: the system message folds into the first user turn
    system_close: str
    default_system: str | None = None  # what the template writes when no system message is given


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool
) -> str:
    from finetune.chat import render_text

    return render_text(tokenizer, messages, add_generation_prompt=prompt)


def _cut_after(text: str, marker: str) -> tuple[str, str] | None:
    """Split after ``marker`` and the spaces/newlines that follow it (the end of a turn)."""
    at = text.find(marker)
    if not marker or at < 0:
        return None
    end = at + len(marker)
    while end < len(text) and text[end] in " \n":
        end += 1
    return text[:end], text[end:]


def turn_text(tokenizer: PreTrainedTokenizerBase, *, strip_bos: bool) -> TurnText | None:
    """Cut the chat template into turn pieces; None when it is not that regular."""
    from finetune.chat import chat_format

    user1 = {"role": "user", "content": _Q1}
    text = _render(
        tokenizer,
        [user1, {"role": "assistant", "content": _A1}, {"role": "user", "content": _Q2}],
        True,
    )
    head, rest = text.split(_Q1, 1)
    user_close, rest = rest.split(_A1, 1)
    between, generation = rest.split(_Q2, 1)
    # A BOS opens the prompt once (Mistral's <s>); SmolLM2 names <|im_start|> its BOS,
    # but that opens every turn and is part of the turn text.
    bos = tokenizer.bos_token or ""
    if bos in between:
        bos = ""
    leading = ""
    if bos and head.startswith(bos):
        head = head[len(bos) :]
        leading = "" if strip_bos else bos  # when llama.cpp adds it, the template must not
    cut = _cut_after(between, chat_format(tokenizer).end_of_turn)
    if cut is None or not head.endswith(cut[1]):
        return None
    answer_close, user_open = cut
    default_turn = head[: len(head) - len(user_open)]  # SmolLM2 writes a system turn unasked

    system_open, system_close, default_system = None, "", None
    with_system = _render(tokenizer, [{"role": "system", "content": _SYS}, user1], True)
    if _SYS in with_system:
        before, after = with_system.split(_SYS, 1)
        if bos and before.startswith(bos):
            before = before[len(bos) :]
        separator = after.split(_Q1, 1)[0]
        if before == user_open:  # folded: "[INST] system\n\nquestion [/INST]"
            system_close = separator
        else:
            cut = _cut_after(separator, chat_format(tokenizer).end_of_turn)
            if cut is None or cut[1] != user_open:
                return None
            system_open, system_close = before, cut[0]
            if default_turn.startswith(system_open) and default_turn.endswith(system_close):
                default_system = default_turn[
                    len(system_open) : len(default_turn) - len(system_close)
                ]
    if default_turn and default_system is None:
        return None
    return TurnText(
        leading,
        user_open,
        user_close,
        generation,
        answer_close,
        system_open,
        system_close,
        default_system or None,
    )


def go_template(turns: TurnText) -> str:
    """Ollama's TEMPLATE for the same prompt text (one line: Go templates keep every newline)."""
    user = (
        f"{turns.user_open}"
        + (
            ""
            if turns.system_open is not None
            else f"{{{{ if and $.System (le $i 1) }}}}{{{{ $.System }}}}{turns.system_close}{{{{ end }}}}"
        )
        + f"{{{{ .Content }}}}{{{{ if $last }}}}{turns.generation}{{{{ else }}}}{turns.user_close}{{{{ end }}}}"
    )
    system = (
        ""
        if turns.system_open is None
        else f'{{{{ if eq .Role "system" }}}}{turns.system_open}{{{{ .Content }}}}{turns.system_close}{{{{ end }}}}'
    )
    return (
        turns.bos
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + system
        + f'{{{{ if eq .Role "user" }}}}{user}{{{{ end }}}}'
        + f'{{{{ if eq .Role "assistant" }}}}{{{{ .Content }}}}{{{{ if not $last }}}}{turns.answer_close}{{{{ end }}}}{{{{ end }}}}'
        + "{{ end }}"
    )


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def modelfile_text(
    tokenizer: PreTrainedTokenizerBase,
    *,
    adds_bos: bool,
    system: str | None,
    merged: bool = False,
) -> str:
    from finetune.chat import chat_format, token_text
    from finetune.generation import GenerationSettings

    fmt = chat_format(tokenizer)
    settings = GenerationSettings()
    lines = ["# Ollama: ollama create NAME -f Modelfile (see README.md)"]
    if merged:
        lines.append("FROM ./merged.gguf")
    else:
        lines += ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    turns = turn_text(tokenizer, strip_bos=adds_bos)
    if turns is None:
        lines.append("# no TEMPLATE: the chat template is not one fixed text per turn;")
        lines.append("# Ollama falls back to the chat template in the GGUF's metadata")
    else:
        lines.append(f'TEMPLATE """{go_template(turns)}"""')
    system = system or (turns.default_system if turns else None)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    stops = [token_text(tokenizer, i) for i in fmt.stop_token_ids]
    for stop in dict.fromkeys([*stops, *fmt.stop_strings]):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    lines += [
        f"PARAMETER temperature {settings.temperature}",
        f"PARAMETER top_p {settings.top_p}",
        f"PARAMETER repeat_penalty {settings.repetition_penalty}",
        f"PARAMETER num_predict {settings.max_new_tokens}",
    ]
    return "\n".join(lines) + "\n"


def readme_text(*, run: str, files: dict[str, int], merged: bool, adds_bos: bool) -> str:
    sizes = "\n".join(f"- `{name}`: {size / 2**20:,.1f} MiB" for name, size in files.items())
    single = (
        "\n`merged.gguf` is the adapter folded into the base, for tools that take one file:\n"
        "`llama-cli -m merged.gguf -cnv`.\n"
        if merged
        else ""
    )
    return f"""# {run} as GGUF

Exported by `python -m finetune export` from the run `{run}`: the base model from its
unquantized safetensors, and the run's LoRA adapter in llama.cpp's adapter format.

{sizes}

The chat template, special tokens and BOS rule (BOS {"added" if adds_bos else "not added"}
to every prompt, as the Hugging Face tokenizer does) are in `base.gguf`'s metadata.

## llama.cpp

    llama-cli -m base.gguf --lora adapter.gguf -cnv
    llama-server -m base.gguf --lora adapter.gguf --port 8080
{single}
## Ollama

    ollama create ski -f Modelfile
    ollama run ski

The Modelfile sets the prompt template, stop markers and the bot's sampling defaults.

## LM Studio

Copy `base.gguf` into a folder under LM Studio's models directory
(`~/.lmstudio/models/<publisher>/<name>/`) and load it; LM Studio loads no LoRA files,
so export with `--merged` and use `merged.gguf` for the finetuned model.
"""
