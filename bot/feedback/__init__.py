"""Votes on the bot's answers, kept as preference data for the next finetune.

Every answer a front end shows (Discord, the HTTP API) can be recorded with the
conversation the model saw, the served model's name, its adapter and the
generation settings; users then vote 👍/👎 on one answer or pick the better
answer of a pair of any two served models. :mod:`bot.feedback.store` keeps it
all in one SQLite file, :mod:`bot.feedback.aio` lets the event loop use it
without blocking, :mod:`bot.feedback.export` turns it into trl preference
datasets and :mod:`bot.feedback.leaderboard` into the community's ranking.
"""
