"""Conversations: the list, a conversation's page, new, rename, delete, and the no-script message forms."""

from __future__ import annotations

from flask import current_app, flash, redirect, request, url_for
from flask_login import current_user, login_required

from chatapp import rate_limits
from chatapp.chat import services as chat
from chatapp.chat.reply_notices import publish_stopped
from chatapp.chat.runner import commit_and_start_reply, get_runner, reserves_a_reply
from chatapp.db import begin_write, db, transaction
from chatapp.errors import AppError, Conflict, InvalidInput
from chatapp.security import parse_bounded_int
from chatapp.web import bp, pages
from chatapp.web.forms import MessageForm, RenameForm, add_error


def _back_to(conversation_id: int) -> str:
    """The conversation's page, with the sidebar on the page it was on (``?older=``)."""
    return url_for("web.conversation", conversation_id=conversation_id, older=request.args.get("older") or None)


def _before_arg() -> int | None:
    """``?before=``, the id the "earlier messages" link gives; a bad one shows the newest page.

    Not ``type=int``: int() takes "１２" and numbers no id column holds (an overflow, a 500).
    """
    return parse_bounded_int(request.args.get("before", ""))


def _render_conversation(conversation_id: int, *, message_form=None, rename_form=None, status=200):
    conversation = chat.get_conversation(current_user.id, conversation_id)
    per_page = current_app.config["WEB_MESSAGES_PER_PAGE"]
    before = _before_arg()
    return pages.render_page(
        "chat/conversation.html",
        conversation=pages.conversation_item(conversation),
        history=pages.history(conversation.id, per_page, before),
        sidebar=pages.current_sidebar(conversation.id),
        message_form=message_form or MessageForm(formdata=None),
        rename_form=rename_form or RenameForm(formdata=None, title=conversation.title),
        # An earlier page of the history offers the way back to the newest messages.
        earlier_page=before is not None,
        # The sidebar's "Rename" (?rename=1) opens the rename pop-over, also without a script.
        rename_open=request.args.get("rename") == "1",
        chat_settings=pages.chat_settings(conversation.model, conversation.system_prompt),
        blank_user_message=pages.BLANK_USER_MESSAGE,
    ), status


@bp.get("/")
@login_required
@transaction("read")
def index():
    """Your conversations, newest first (or what to do when there are none)."""
    return pages.render_page("chat/index.html", sidebar=pages.current_sidebar())


@bp.get("/c/<int:conversation_id>")
@login_required
@transaction("read")
def conversation(conversation_id: int):
    """A conversation: its history and the message box."""
    return _render_conversation(conversation_id)


@bp.post("/c/<int:conversation_id>/rename")
@login_required
@transaction("write-after")
def rename(conversation_id: int):
    """Give a conversation a new title."""
    form = RenameForm()
    if not form.validate_on_submit():
        return _render_conversation(conversation_id, rename_form=form, status=422)
    begin_write()
    conversation = chat.get_conversation(current_user.id, conversation_id)
    try:
        chat.rename_conversation(conversation, form.title.data)
    except AppError as error:
        db.session.rollback()  # the page re-renders holding no write lock
        add_error(form, error, "title")
        return _render_conversation(conversation_id, rename_form=form, status=error.status)
    db.session.commit()
    return redirect(_back_to(conversation_id))


@bp.get("/c/<int:conversation_id>/delete")
@login_required
@transaction("read")
def confirm_delete(conversation_id: int):
    """Ask before deleting a conversation."""
    conversation = chat.get_conversation(current_user.id, conversation_id)
    return pages.render_page(
        "chat/delete.html",
        conversation=pages.conversation_item(conversation),
        sidebar=pages.current_sidebar(conversation.id),
    )


@bp.post("/c/<int:conversation_id>/delete")
@login_required
@transaction("write")
def delete(conversation_id: int):
    """Delete a conversation and its messages."""
    conversation = chat.get_conversation(current_user.id, conversation_id)
    title = conversation.title
    chat.delete_conversation(conversation)
    db.session.commit()
    flash(f"Deleted “{title}”.", "success")
    return redirect(url_for("web.index"))


@bp.post("/c/<int:conversation_id>/messages")
@login_required
@rate_limits.messages
@reserves_a_reply
@transaction("write-after")
def send_message(conversation_id: int, reservation):
    """Send a message without JavaScript; the page then shows the reply as it was when loaded."""
    form = MessageForm()
    if not form.validate_on_submit():
        return _render_conversation(conversation_id, message_form=form, status=422)
    begin_write()
    conversation = chat.get_conversation(current_user.id, conversation_id)
    try:
        _message, reply = chat.post_message(conversation, form.content.data)
    except AppError as error:
        db.session.rollback()  # the page re-renders holding no write lock
        add_error(form, error, "content")
        return _render_conversation(conversation_id, message_form=form, status=error.status)
    commit_and_start_reply(current_app, reply.id, reply.attempt, reservation)
    return redirect(_back_to(conversation_id))


@bp.post("/c/<int:conversation_id>/messages/<int:reply_id>/regenerate")
@login_required
@rate_limits.regenerations
@reserves_a_reply
@transaction("write")
def regenerate(conversation_id: int, reply_id: int, reservation):
    """Generate a finished or failed reply again, without JavaScript."""
    conversation = chat.get_conversation(current_user.id, conversation_id)
    reply = chat.restart_reply(conversation, chat.get_reply(conversation, reply_id))
    commit_and_start_reply(current_app, reply.id, reply.attempt, reservation)
    return redirect(url_for("web.conversation", conversation_id=conversation_id))


@bp.post("/c/<int:conversation_id>/messages/<int:reply_id>/stop")
@login_required
@transaction("write")
def stop_reply(conversation_id: int, reply_id: int):
    """Stop a reply being generated, without JavaScript; it keeps its text so far."""
    conversation = chat.get_conversation(current_user.id, conversation_id)
    try:
        reply = chat.stop_reply(conversation, chat.get_reply(conversation, reply_id))
    except Conflict:
        flash("That reply had already finished.", "info")
    else:
        db.session.commit()
        # At once if it runs in this process; elsewhere its process notices within a second.
        get_runner(current_app).cancel(reply_id)
        publish_stopped(current_app, reply.id, reply.attempt, len(reply.content or ""))
    return redirect(url_for("web.conversation", conversation_id=conversation_id))


@bp.get("/c/<int:conversation_id>/messages/<int:reply_id>")
@login_required
@transaction("read")
def reply_fragment(conversation_id: int, reply_id: int):
    """One reply as HTML (sanitized Markdown), which the page swaps in when a stream ends."""
    conversation = chat.get_conversation(current_user.id, conversation_id)
    return pages.render_page(
        "chat/_message.html",
        message=pages.reply_item(conversation, reply_id),
        conversation=pages.conversation_item(conversation),
    )


# While a reply streams, the page shows the text so far rendered here, as it will look when
# finished, instead of raw Markdown that jumps when the reply ends. The page asks for it at
# most every 250 ms (the rate the reply's text is committed at), one request at a time, when
# its stream says there is new text. Rendering on this request rather than into the API's
# event stream keeps that stream plain text for scripts, costs nothing when no browser
# watches, works the same when the reply runs in another worker, and renders, like every
# page, after the read ended and its connection went back to the pool.
@bp.get("/c/<int:conversation_id>/messages/<int:reply_id>/text")
@login_required
@transaction("read")
def reply_text(conversation_id: int, reply_id: int):
    """A reply's text so far as sanitized HTML, which the page shows while the reply streams."""
    text = pages.reply_text(current_user.id, conversation_id, reply_id)
    html = pages.render_page("chat/_reply_text.html", reply=text)
    return html, 200, {"Cache-Control": "no-store"}


# --- branches: edit a message, switch between versions (forms that work without JavaScript) ---


def _render_edit(conversation_id: int, message_id: int, form: MessageForm, status: int = 200):
    conversation = chat.get_conversation(current_user.id, conversation_id)
    message = pages.user_message(conversation, message_id)
    if form.content.data is None:
        form.content.data = message.content
    return pages.render_page(
        "chat/edit.html",
        conversation=pages.conversation_item(conversation),
        message=message,
        form=form,
        sidebar=pages.current_sidebar(conversation.id),
    ), status


@bp.get("/c/<int:conversation_id>/messages/<int:message_id>/edit")
@login_required
@transaction("read")
def edit_message_form(conversation_id: int, message_id: int):
    """The edit form of one of your messages."""
    return _render_edit(conversation_id, message_id, MessageForm(formdata=None))


@bp.post("/c/<int:conversation_id>/messages/<int:message_id>/edit")
@login_required
@rate_limits.messages
@reserves_a_reply
@transaction("write-after")
def edit_message(conversation_id: int, message_id: int, reservation):
    """Save an edit: a new version of the message, and its reply, become the current branch."""
    form = MessageForm()
    if not form.validate_on_submit():
        return _render_edit(conversation_id, message_id, form, status=422)
    begin_write()
    chat.check_conversation(current_user.id, conversation_id)
    try:
        _message, reply = chat.edit_message(conversation_id, message_id, form.content.data)
    except AppError as error:
        db.session.rollback()  # the page re-renders holding no write lock
        if error.status == 404:
            raise
        add_error(form, error, "content")
        return _render_edit(conversation_id, message_id, form, status=error.status)
    commit_and_start_reply(current_app, reply.id, reply.attempt, reservation)
    return redirect(url_for("web.conversation", conversation_id=conversation_id))


@bp.post("/c/<int:conversation_id>/branch")
@login_required
@transaction("write")
def select_branch(conversation_id: int):
    """Show another version of a message (‹ 2/3 ›): the branch through it becomes current."""
    conversation = chat.get_conversation(current_user.id, conversation_id)
    message_id = parse_bounded_int(request.form.get("message_id", ""))
    if message_id is None:
        raise InvalidInput("choose a message", field="message_id")
    chat.select_branch(conversation, message_id)
    db.session.commit()
    return redirect(url_for("web.conversation", conversation_id=conversation_id, _anchor=f"message-{message_id}"))
