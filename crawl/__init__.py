"""The pipeline's first stage: crawl a forum into a SQLite store, build the Q/A dataset from it.

``python -m crawl check | fetch | dataset | serve-sample``; see ``docs/crawl.md``. Nothing
here imports ``finetune`` or ``bot``: later stages read this one's files.
"""
