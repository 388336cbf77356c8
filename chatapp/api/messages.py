"""Messages: list, post (starts a reply), regenerate a reply, stream a reply."""

from flask import Response, current_app, g, request

from chatapp.api.auth import current_user_id
from chatapp.api.blueprint import api_blueprint
from chatapp.api.docs import error_responses
from chatapp.api.schemas import (
    MessageIn,
    MessageOut,
    MessagePage,
    PageQuery,
    PostedMessage,
    json_response,
    message_json,
)
from chatapp.chat import services as chat
from chatapp.chat.models import Message
from chatapp.chat.runner import commit_and_start_reply
from chatapp.chat.stream import parse_last_event_id, reply_events
from chatapp.db import db

blp = api_blueprint("messages", "Messages and bot replies", authenticated=True)


# Schema instances, not classes: given a class, webargs builds an instance per request.
@blp.get("/conversations/<int:conversation_id>/messages")
@blp.arguments(PageQuery(), location="query")
@blp.response(200, MessagePage)
@error_responses(blp, 401, 404, 422, 503)
def list_messages(query, conversation_id):
    """List a conversation's messages, oldest first."""
    # The hottest read: an id-only ownership check, rows not objects, dumped by hand.
    chat.check_conversation(current_user_id(), conversation_id)
    page = chat.list_messages(conversation_id, query["limit"], query["cursor"])
    return json_response(
        {"items": [message_json(row) for row in page.items], "next_cursor": page.next_cursor}
    )


@blp.post("/conversations/<int:conversation_id>/messages")
@blp.arguments(MessageIn())
@blp.response(202, PostedMessage)
@error_responses(blp, 400, 401, 404, 409, 413, 415, 422, 503)
def post_message(body, conversation_id):
    """Send a message; the bot's reply starts as "pending" and can be streamed."""
    chat.check_conversation(current_user_id(), conversation_id)
    message, reply = chat.post_message_to(conversation_id, body["content"])
    commit_and_start_reply(current_app, reply.id, reply.attempt)
    return json_response({"message": message_json(message), "reply": message_json(reply)}, 202)


@blp.post("/conversations/<int:conversation_id>/messages/<int:reply_id>/regenerate")
@blp.response(202, MessageOut)
@error_responses(blp, 401, 404, 409, 503)
def regenerate_reply(conversation_id, reply_id):
    """Restart a complete or failed reply from scratch."""
    conversation = chat.get_conversation(current_user_id(), conversation_id)
    reply = chat.restart_reply(conversation, chat.get_reply(conversation, reply_id))
    commit_and_start_reply(current_app, reply.id, reply.attempt)
    # Loaded again: after a commit that failed but landed, the session is a new one.
    return db.session.get(Message, reply_id)


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
@error_responses(blp, 401, 404, 503)
def stream_reply(conversation_id, reply_id):
    """Stream a reply's text as it is generated (stored text first)."""
    chat.check_conversation(current_user_id(), conversation_id)
    resume = parse_last_event_id(request.headers.get("Last-Event-ID"))
    # Read here, in the request's session, so the stream starts without a read of its own.
    first = chat.get_reply_progress(conversation_id, reply_id, resume[1] if resume else 0)
    # The request's session ends when this view returns; the generator holds nothing
    # while it waits and reads in short units of work of its own.
    db.session.commit()
    return Response(
        # g.credential is plain data (kind and id): the stream re-checks it as it reads.
        reply_events(current_app._get_current_object(), reply_id, resume, first, g.credential),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
