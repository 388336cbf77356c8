"""Conversations: list, create, read, rename (and change model or system prompt), delete."""

from chatapp import rate_limits
from chatapp.api.auth import current_user_id
from chatapp.api.blueprint import api_blueprint
from chatapp.api.docs import error_responses
from chatapp.api.fast_args import PAGE_QUERY_PARSER
from chatapp.api.schemas import (
    ConversationIn,
    ConversationOut,
    ConversationPage,
    ConversationPatch,
    PageQuery,
    conversation_json,
    json_response,
)
from chatapp.chat import catalog
from chatapp.chat import services as chat
from chatapp.db import begin_write, db, end_transaction, transaction
from chatapp.errors import InvalidInput

blp = api_blueprint("conversations", "Conversations", authenticated=True)
# Plain page queries (?limit=&cursor=) skip the schema load; see chatapp.api.fast_args.
blp.ARGUMENTS_PARSER = PAGE_QUERY_PARSER


# A schema instance, not the class: given a class, webargs builds an instance per request.
@blp.get("/conversations")
@blp.arguments(PageQuery(), location="query")
@blp.response(200, ConversationPage)
@error_responses(blp, 401, 422, 503)
@transaction("read")
def list_conversations(query):
    """List your conversations, most recently updated first."""
    # Rows, not objects, dumped by hand (see chatapp.api.schemas).
    page = chat.list_conversations(current_user_id(), query["limit"], query["cursor"])
    return json_response({"items": [conversation_json(row) for row in page.items], "next_cursor": page.next_cursor})


@blp.post("/conversations")
@rate_limits.conversations
@blp.arguments(ConversationIn, required=False)  # no body: a conversation titled "New chat"
@blp.response(201, ConversationOut)
@error_responses(blp, 400, 401, 413, 415, 422, 429, 503)
@transaction("write-after")
def create_conversation(body):
    """Start a conversation, optionally with its model and system prompt."""
    # Checked holding nothing: a model other than the default may ask the model server.
    model = catalog.check_model(body.get("model"))
    system_prompt = catalog.check_system_prompt(body.get("system_prompt"))
    begin_write()
    conversation = chat.create_conversation(
        current_user_id(), body.get("title"), model=model, system_prompt=system_prompt
    )
    db.session.commit()
    return conversation


@blp.get("/conversations/<int:conversation_id>")
@blp.response(200, ConversationOut)
@error_responses(blp, 401, 404, 503)
@transaction("read")
def get_conversation(conversation_id):
    """Read one of your conversations."""
    return chat.get_conversation(current_user_id(), conversation_id)


@blp.patch("/conversations/<int:conversation_id>")
@blp.arguments(ConversationPatch)
@blp.response(200, ConversationOut)
@error_responses(blp, 400, 401, 404, 413, 415, 422, 503)
@transaction("write-after")
def rename_conversation(body, conversation_id):
    """Rename one of your conversations, or change its model or system prompt."""
    if not body:
        raise InvalidInput("send at least one of title, model and system_prompt")
    settings = {}
    if "model" in body or "system_prompt" in body:
        # Someone else's conversation is a 404 whatever the body says: looked up first, in a
        # short read that ends before the model check (which may ask the model server).
        chat.check_conversation(current_user_id(), conversation_id)
        end_transaction()
    if "model" in body:
        settings["model"] = catalog.check_model(body["model"])
    if "system_prompt" in body:
        settings["system_prompt"] = catalog.check_system_prompt(body["system_prompt"])
    begin_write()
    conversation = chat.get_conversation(current_user_id(), conversation_id)
    if "title" in body:
        chat.rename_conversation(conversation, body["title"])
    if settings:
        chat.change_conversation_settings(conversation, **settings)
    db.session.commit()
    return conversation


@blp.delete("/conversations/<int:conversation_id>")
@blp.response(204)
@error_responses(blp, 401, 404, 503)
@transaction("write")
def delete_conversation(conversation_id):
    """Delete one of your conversations and all its messages."""
    chat.delete_conversation(chat.get_conversation(current_user_id(), conversation_id))
    db.session.commit()
    return ""
