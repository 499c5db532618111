"""What answered: the model, the adapter and the generation settings stamped on every record.

Built once per process from the engine settings, off the event loop (hashing
a 7B adapter's weights reads tens of megabytes), and shared by every front
end so a Discord vote and an API vote on the same adapter land in one bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.feedback.ids import new_answer_id
from bot.feedback.records import AdapterRef, AnswerRecord, Source, source_refs
from bot.serving.engine import Answer, Message
from bot.serving.settings import EngineSettings


@dataclass(frozen=True)
class Provenance:
    """The base model, the configured adapter and the settings of this process.

    ``adapter`` is what :meth:`record` stamps (base answers included, as
    before several adapters were served); :meth:`of_answer` stamps the
    adapter the engine says wrote the answer, which is how several adapters,
    loaded or promoted at runtime, are told apart.
    """

    model: str
    adapter: AdapterRef
    settings: dict[str, Any] = field(default_factory=dict)

    def record(
        self,
        conversation: Sequence[Message],
        text: str,
        variant: str,
        source: Source,
        *,
        answer_id: str | None = None,
        pair_id: str | None = None,
        thread_key: str | None = None,
        sources: Sequence[Any] = (),
    ) -> AnswerRecord:
        """The record of one answer served as ``variant``; ``sources`` are the passages shown.

        ``variant`` is the name it is recorded under: ``base`` or an adapter's
        own name (:meth:`of_answer` resolves the alias ``finetuned`` to the
        adapter behind it, so a promotion never mixes two adapters' votes).
        """
        return AnswerRecord(
            conversation=list(conversation),
            text=text,
            variant=variant,
            model=self.model,
            source=source,
            adapter=self.adapter,
            settings=self.settings,
            answer_id=answer_id or new_answer_id(),
            pair_id=pair_id,
            thread_key=thread_key,
            sources=source_refs(sources),
        )

    def of_answer(
        self,
        conversation: Sequence[Message],
        answer: Answer,
        source: Source,
        *,
        answer_id: str | None = None,
    ) -> AnswerRecord:
        """The record of an engine's ``answer``, under the name and weights that wrote it.

        An answer asked of ``finetuned`` is recorded under the adapter it
        resolved to, with the hash the engine read its weights under, so an
        adapter loaded or promoted at runtime is told apart without rebuilding
        this provenance. An engine that cannot hash the weights (an
        OpenAI-compatible server's) leaves the hash to a configured local copy
        (``ADAPTER_PATH`` beside ``INFERENCE_BACKEND=openai``), if there is one.
        """
        served = answer.adapter
        name = served.name if served is not None else answer.variant
        record = self.record(
            conversation, answer.text, name, source, answer_id=answer_id, sources=answer.sources
        )
        if served is None:
            return record
        adapter = AdapterRef(path=served.path, hash=served.weights_hash)
        if served.weights_hash is None and record.adapter.hash is not None:
            adapter = record.adapter  # a local copy of the remote adapter, hashed at start
        return dataclasses.replace(record, adapter=adapter)


def provenance_for(settings: EngineSettings) -> Provenance:
    """The provenance of this process's answers; blocking (hashes the adapter's weights).

    With the OpenAI backend the adapter is named by its model name on that
    server, hashed only when ``ADAPTER_PATH`` also points at a local copy.
    """
    local_adapter = settings.adapter_path if settings.adapter_path else None
    adapter = AdapterRef.from_path(local_adapter)
    if settings.backend == "openai":
        model = settings.base_model_name
        adapter = AdapterRef(
            path=str(local_adapter) if local_adapter else settings.finetuned_model_name,
            hash=adapter.hash,
        )
    else:
        model = settings.base_model
    return Provenance(
        model=model,
        adapter=adapter,
        settings={
            "backend": settings.backend,
            "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "repetition_penalty": settings.repetition_penalty,
        },
    )
