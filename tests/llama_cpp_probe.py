"""Ask llama.cpp (through llama-cpp-python) for token ids and teacher-forced log-probs.

Run as a subprocess by the export tests: a malformed GGUF or adapter makes
llama.cpp abort the whole process, which must fail one test, not the run.
Reads a JSON request on stdin, writes a JSON answer on stdout:

    {"model": PATH, "lora": PATH|null, "texts": [str], "sequences": [[id]], "targets": [[id]]}
    -> {"tokens": [[id]], "argmax": [[id]], "logprobs": [[float]], "n_vocab": int}

``argmax[s][p]`` is llama.cpp's next-token choice after position ``p`` of
sequence ``s``; ``logprobs[s][p]`` its log-probability of ``targets[s][p]``
there (the token the reference chose).
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import numpy as np
    from llama_cpp import Llama

    request = json.load(sys.stdin)
    longest = max((len(s) for s in request.get("sequences", [])), default=16)
    llm = Llama(
        model_path=request["model"],
        lora_path=request.get("lora"),
        n_ctx=max(64, longest + 8),
        n_batch=max(64, longest + 8),
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    # add_bos=True means "add the special tokens the GGUF says to add": the BOS rule under test
    tokens = [
        llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in request["texts"]
    ]
    argmax, logprobs = [], []
    for sequence, targets in zip(
        request.get("sequences", []), request.get("targets", []), strict=True
    ):
        llm.reset()
        llm.eval(sequence)
        scores = np.asarray(llm.scores[: len(sequence)], dtype=np.float64)
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        argmax.append(log_softmax.argmax(axis=1).tolist())
        logprobs.append(log_softmax[np.arange(len(targets)), targets].tolist())
    json.dump(
        {"tokens": tokens, "argmax": argmax, "logprobs": logprobs, "n_vocab": llm.n_vocab()},
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
