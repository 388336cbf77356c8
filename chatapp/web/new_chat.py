"""A new chat: an empty composer that creates the conversation with its first message, and
a conversation's model and system prompt. "New chat" itself writes nothing, so opening it
again and again leaves no empty conversations behind."""

from __future__ import annotations

from flask import current_app, flash, redirect, url_for
from flask_login import current_user, login_required

from chatapp import rate_limits
from chatapp.chat import catalog
from chatapp.chat import services as chat
from chatapp.chat.runner import commit_and_start_reply, reserves_a_reply
from chatapp.db import begin_write, db, end_transaction, transaction
from chatapp.errors import AppError
from chatapp.web import bp, pages
from chatapp.web.forms import ChatSettingsForm, NewChatForm, add_error, sentence


def _render_new_chat(form: NewChatForm, status: int = 200):
    return pages.render_page(
        "chat/new.html",
        form=form,
        chat_settings=pages.chat_settings(form.model.data or None, form.system_prompt.data),
        sidebar=pages.current_sidebar(),
    ), status


@bp.get("/chat/new")
@login_required
@transaction("read")
def new_chat():
    """An empty composer for a new conversation (nothing is stored until the first message)."""
    return _render_new_chat(NewChatForm(formdata=None))


@bp.post("/chat/new")
@login_required
@rate_limits.conversations
@rate_limits.messages
@reserves_a_reply
@transaction("write-after")
def start_chat(reservation):
    """Create a conversation with its first message and settings, start the reply, open it."""
    form = NewChatForm()
    if not form.validate_on_submit():
        return _render_new_chat(form, 422)
    try:
        # Checked holding nothing: a model other than the default may ask the model server.
        model = catalog.check_model(form.model.data)
        system_prompt = catalog.check_system_prompt(form.system_prompt.data)
    except AppError as error:
        add_error(form, error, "content")
        return _render_new_chat(form, error.status)
    begin_write()
    try:
        conversation = chat.create_conversation(current_user.id, model=model, system_prompt=system_prompt)
        _message, reply, _created = chat.post_message_to(conversation.id, form.content.data)
    except AppError as error:
        db.session.rollback()  # the page re-renders holding no write lock
        add_error(form, error, "content")
        return _render_new_chat(form, error.status)
    # One transaction: the conversation, the message and the pending reply land together.
    commit_and_start_reply(current_app, reply.id, reply.attempt, reservation)
    return redirect(url_for("web.conversation", conversation_id=conversation.id))


@bp.post("/c/<int:conversation_id>/settings")
@login_required
@transaction("write-after")
def chat_settings(conversation_id: int):
    """Change a conversation's model and system prompt; the next reply uses them."""
    # Someone else's conversation is a 404 whatever the form says (a short read, ended
    # before the model check, which may ask the model server).
    chat.check_conversation(current_user.id, conversation_id)
    end_transaction()
    form = ChatSettingsForm()
    problems = [] if form.validate_on_submit() else [e for errors in form.errors.values() for e in errors]
    if not problems:
        try:
            model = catalog.check_model(form.model.data)
            system_prompt = catalog.check_system_prompt(form.system_prompt.data)
        except AppError as error:
            problems.append(sentence(error.message))
    if problems:
        # The conversation page says why; nothing was stored (its existence is checked there).
        for problem in problems:
            flash(problem, "error")
        return redirect(url_for("web.conversation", conversation_id=conversation_id))
    begin_write()
    conversation = chat.get_conversation(current_user.id, conversation_id)
    chat.change_conversation_settings(conversation, model=model, system_prompt=system_prompt)
    db.session.commit()
    flash("Settings saved; the next reply uses them.", "success")
    return redirect(url_for("web.conversation", conversation_id=conversation_id))
