"""What answered: the model, the adapter and the generation settings stamped on every record.

Built once per process from the engine settings, off the event loop (hashing
a 7B adapter's weights reads tens of megabytes), and shared by every front
end so a Discord vote and an API vote on the same adapter land in one bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.feedback.ids import new_answer_id
from bot.feedback.records import AdapterRef, AnswerRecord, Source, source_refs
from bot.serving.engine import Message, Variant
from bot.serving.settings import EngineSettings


@dataclass(frozen=True)
class Provenance:
    model: str
    adapter: AdapterRef
    settings: dict[str, Any] = field(default_factory=dict)

    def record(
        self,
        conversation: Sequence[Message],
        text: str,
        variant: Variant,
        source: Source,
        *,
        answer_id: str | None = None,
        pair_id: str | None = None,
        thread_key: str | None = None,
        sources: Sequence[Any] = (),
    ) -> AnswerRecord:
        """The record of one answer; ``sources`` are the passages shown with it."""
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
