"""Messages: list, post (starts a reply), edit, regenerate, branches, stop and stream a reply."""

import functools
import weakref

from flask import Response, current_app, g, request

from chatapp import rate_limits
from chatapp.api.auth import current_user_id
from chatapp.api.blueprint import api_blueprint
from chatapp.api.docs import error_responses
from chatapp.api.fast_args import PAGE_QUERY_PARSER
from chatapp.api.fast_json import message_page_response
from chatapp.api.schemas import (
    BranchIn,
    BranchMessageOut,
    BranchOut,
    MessageIn,
    MessageOut,
    MessagePage,
    PageQuery,
    PostedMessage,
    SiblingList,
    branch_message_json,
    json_response,
    message_json,
)
from chatapp.chat import services as chat
from chatapp.chat import stream_slots
from chatapp.chat.reply_notices import publish_stopped
from chatapp.chat.runner import commit_and_start_reply, get_runner, reserves_a_reply
from chatapp.chat.stream import parse_last_event_id, reply_events
from chatapp.db import db, transaction
from chatapp.errors import InvalidInput

# A branch switch answers the branch's first page, as large as GET .../messages's default one.
DEFAULT_PAGE_LIMIT = PageQuery().fields["limit"].load_default

blp = api_blueprint("messages", "Messages and bot replies", authenticated=True)
# Plain page queries (?limit=&cursor=) skip the schema load; see chatapp.api.fast_args.
blp.ARGUMENTS_PARSER = PAGE_QUERY_PARSER

IDEMPOTENCY_KEY_MAX = 100
IDEMPOTENCY_KEY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX, "pattern": "^[ -~]*$"},
    "description": "A unique key per message (a UUID, say). Retrying the POST with the same "
    "key and content (after a timeout, an outage or a lost answer) returns the message and "
    "reply sent the first time, with status 202, instead of a duplicate or a 409.",
}


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header: 1-100 printable ASCII characters, or None."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
        raise InvalidInput(
            f"header 'Idempotency-Key' must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters",
            field="Idempotency-Key",
        )
    return key


def with_idempotency_key(view):
    """Pass the checked Idempotency-Key header as ``key``, before the view's write begins."""

    @functools.wraps(view)
    def check_header_first(*args, **kwargs):
        return view(*args, key=idempotency_key(), **kwargs)

    return check_header_first


# Schema instances, not classes: given a class, webargs builds an instance per request.
@blp.get("/conversations/<int:conversation_id>/messages")
@blp.arguments(PageQuery(), location="query")
@blp.response(200, MessagePage)
@error_responses(blp, 401, 404, 422, 503)
@transaction("read")
def list_messages(query, conversation_id):
    """List a conversation's messages, oldest first."""
    # The hottest read: an id-only ownership check, rows not objects, dumped by hand.
    connection = db.session.connection()  # both reads on it, fetched from the session once
    chat.check_conversation(current_user_id(), conversation_id, connection)
    page = chat.list_messages(conversation_id, query["limit"], query["cursor"], connection)
    return message_page_response(page.items, page.next_cursor)


@blp.post("/conversations/<int:conversation_id>/messages")
@rate_limits.messages
@blp.arguments(MessageIn())
@blp.response(202, PostedMessage)
@blp.doc(parameters=[IDEMPOTENCY_KEY_PARAMETER])
@error_responses(blp, 400, 401, 404, 409, 413, 415, 422, 429, 503)
@with_idempotency_key
@reserves_a_reply
@transaction("write")
def post_message(body, conversation_id, key, reservation):
    """Send a message; the bot's reply starts as "pending" and can be streamed."""
    chat.check_conversation(current_user_id(), conversation_id)
    message, reply, created = chat.post_message_to(conversation_id, body["content"], key)
    # Plain data before the commit, as the exchange was written (see regenerate_reply).
    message_out, reply_out = with_siblings(conversation_id, message, reply)
    if created:
        commit_and_start_reply(current_app, reply.id, reply.attempt, reservation)
    return json_response({"message": message_out, "reply": reply_out}, 202)


def with_siblings(conversation_id: int, *messages) -> list[dict]:
    """Messages as BranchMessageOut: their columns and their place among their versions."""
    infos = chat.sibling_info(conversation_id, messages)
    return [{**message_json(message), "siblings": info} for message, info in zip(messages, infos, strict=True)]


@blp.post("/conversations/<int:conversation_id>/messages/<int:message_id>/edit")
@rate_limits.messages
@blp.arguments(MessageIn())
@blp.response(202, PostedMessage)
@error_responses(blp, 400, 401, 404, 409, 413, 415, 422, 429, 503)
@reserves_a_reply
@transaction("write")
def edit_message(body, conversation_id, message_id, reservation):
    """Edit one of your messages: a new version of it and a new reply become the current branch."""
    chat.check_conversation(current_user_id(), conversation_id)
    message, reply = chat.edit_message(conversation_id, message_id, body["content"])
    message_out, reply_out = with_siblings(conversation_id, message, reply)
    commit_and_start_reply(current_app, reply.id, reply.attempt, reservation)
    return json_response({"message": message_out, "reply": reply_out}, 202)


@blp.post("/conversations/<int:conversation_id>/messages/<int:reply_id>/regenerate")
@rate_limits.regenerations
@blp.response(202, BranchMessageOut)
@error_responses(blp, 401, 404, 409, 429, 503)
@reserves_a_reply
@transaction("write")
def regenerate_reply(conversation_id, reply_id, reservation):
    """Generate the latest reply again, as a new version beside it (which becomes current)."""
    conversation = chat.get_conversation(current_user_id(), conversation_id)
    version = chat.restart_reply(conversation, chat.get_reply(conversation, reply_id))
    # Plain data now: the reply as this request made it (the runner may change it at once,
    # and after a commit that failed but landed the session is a new one).
    (restarted,) = with_siblings(conversation_id, version)
    commit_and_start_reply(current_app, version.id, version.attempt, reservation)
    return json_response(restarted, 202)


@blp.get("/conversations/<int:conversation_id>/messages/<int:message_id>/siblings")
@blp.response(200, SiblingList)
@error_responses(blp, 401, 404, 503)
@transaction("read")
def list_siblings(conversation_id, message_id):
    """List the versions of a message (it and those with its parent), oldest first."""
    chat.check_conversation(current_user_id(), conversation_id)
    items = chat.list_siblings(conversation_id, message_id)
    return json_response({"items": [branch_message_json(item) for item in items]})


@blp.put("/conversations/<int:conversation_id>/branch")
@blp.arguments(BranchIn())
@blp.response(200, BranchOut)
@error_responses(blp, 400, 401, 404, 413, 415, 422, 503)
@transaction("write")
def select_branch(body, conversation_id):
    """Show and continue the branch through a message, down to its newest leaf."""
    conversation = chat.get_conversation(current_user_id(), conversation_id)
    leaf_id = chat.select_branch(conversation, body["message_id"])
    page = chat.list_messages(conversation_id, DEFAULT_PAGE_LIMIT)
    return json_response(
        {
            "current_leaf_id": leaf_id,
            "items": [branch_message_json(item) for item in page.items],
            "next_cursor": page.next_cursor,
        }
    )


@blp.post("/conversations/<int:conversation_id>/messages/<int:reply_id>/stop")
@blp.response(200, MessageOut)
@error_responses(blp, 401, 404, 409, 503)
@transaction("write")
def stop_reply(conversation_id, reply_id):
    """Stop a reply being generated; it ends "stopped", keeping its text so far."""
    conversation = chat.get_conversation(current_user_id(), conversation_id)
    reply = chat.stop_reply(conversation, chat.get_reply(conversation, reply_id))
    db.session.commit()
    # At once if it runs in this process; elsewhere its process notices within a second.
    get_runner(current_app).cancel(reply_id)
    publish_stopped(current_app, reply.id, reply.attempt, len(reply.content or ""))
    return reply


@blp.get("/conversations/<int:conversation_id>/messages/<int:reply_id>/stream")
@blp.doc(
    responses={
        "200": {
            "description": "Server-sent events: text deltas, then one `done` event with "
            "{status, error}. If the token or browser login the stream was opened with is "
            "revoked or logged out meanwhile, the stream ends within seconds with status "
            "`unauthorized`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }
)
@error_responses(blp, 400, 401, 404, 429, 503)
@transaction("read")
def stream_reply(conversation_id, reply_id):
    """Stream a reply's text as it is generated (stored text first)."""
    chat.check_conversation(current_user_id(), conversation_id)
    resume = parse_last_event_id(request.headers.get("Last-Event-ID"))
    # Read here, in the request's session, so the stream starts without a read of its own.
    first = chat.get_reply_progress(conversation_id, reply_id, resume[1] if resume else 0)
    # The request's session ends when this view returns; the generator holds nothing
    # while it waits and reads in short units of work of its own.
    db.session.commit()
    # An open stream holds a worker thread: one user may hold STREAMS_PER_USER of them.
    # Taken last, so a view that fails has none to give back.
    slot = stream_slots.take(current_app, current_user_id())
    response = Response(
        # g.credential is plain data (kind and id): the stream re-checks it as it reads.
        reply_events(current_app._get_current_object(), reply_id, resume, first, g.credential),  # type: ignore[attr-defined]  # LocalProxy method
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    # The WSGI server closes the response however the stream ends (done, the client gone,
    # an error, or the generator closed before its first event): the slot goes back then.
    # A response never served (an after_request hook failed) gives it back when collected.
    response.call_on_close(slot.release)
    weakref.finalize(response, slot.release)
    return response
