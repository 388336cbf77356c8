"""Which part of a conversation the bot is sent: the newest messages within a character budget.

A model takes a bounded context, and every character sent costs time (and, with a paid
model, money): a conversation of thousands of messages must not all be read and sent for
each reply. Characters stand in for tokens (about four to a token in English text).
"""

from __future__ import annotations

from collections.abc import Iterable


def fit_history(newest_first: Iterable[dict], max_chars: int) -> list[dict]:
    """The newest messages ({"role", "content"}) whose contents fit in ``max_chars``, oldest first.

    ``newest_first`` is read lazily and no further than needed, so a caller can pass
    rows straight from a query. The latest user message, the one the reply answers, is
    always kept, even alone over the budget. Taking stops at the first older message that
    does not fit: the bot sees an unbroken run of the conversation's end, not a history
    with holes in it.
    """
    kept: list[dict] = []
    used = 0
    user_kept = False
    for message in newest_first:
        size = len(message["content"])
        latest_user = not user_kept and message["role"] == "user"
        if used + size > max_chars and not latest_user:
            if user_kept:
                break
            continue  # newer than the user's message and too long: the user's still comes
        kept.append(message)
        used += size
        user_kept = user_kept or latest_user
    kept.reverse()
    return kept
