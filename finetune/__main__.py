"""``python -m finetune``: train (the default), or one of the subcommands below.

python -m finetune --config configs/tiny-cpu.yaml [--key value ...]   train
python -m finetune tiny-model --out DIR [--corpus FILE] [--seed N]     build the test model
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from finetune.errors import UserError, cli_entry

SUBCOMMANDS = ("tiny-model",)


def tiny_model_main(argv: Sequence[str]) -> int:
    from finetune.tiny_model import TinyModelSpec

    defaults = TinyModelSpec()
    parser = argparse.ArgumentParser(
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

    out = build_tiny_model(args.out, corpus_path=args.corpus, seed=args.seed, spec=spec)
    print(f"tiny model written to {out}")
    return 0


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tiny-model":
        return tiny_model_main(argv[1:])
    if argv and not argv[0].startswith("-"):
        raise UserError(
            f"unknown command {argv[0]!r}: use one of {', '.join(SUBCOMMANDS)} or --config"
        )
    raise UserError("training is not built yet: only `python -m finetune tiny-model` works so far")


if __name__ == "__main__":
    sys.exit(main())
