"""The web forms. Each carries a CSRF token; its fields are checked by the rules the API and the
services check (chatapp.inputs), with the limits of the app's config, and worded alike."""

from __future__ import annotations

from flask import request
from flask_wtf import FlaskForm
from flask_wtf.form import _Auto
from werkzeug.datastructures import CombinedMultiDict
from wtforms import BooleanField, PasswordField, SelectField, StringField, TextAreaField
from wtforms.validators import EqualTo, InputRequired, Length, ValidationError

from chatapp import inputs
from chatapp.config import LOGIN_PASSWORD_MAX_LENGTH, LOGIN_USERNAME_MAX_LENGTH
from chatapp.errors import AppError


class Form(FlaskForm):
    """A form read from what browsers send: form fields, never a JSON body.

    Flask-WTF would also take a JSON body, turning whatever it holds (a list, a number, an
    object where text belongs) into field values no validator expects. A JSON body here
    leaves the form empty, so its required fields say so.
    """

    class Meta(FlaskForm.Meta):
        def wrap_formdata(self, form, formdata):
            if formdata is not _Auto:
                return formdata
            if not form.is_submitted():
                return None
            if request.files:
                return CombinedMultiDict((request.files, request.form))
            return request.form


class Rule:
    """A WTForms validator checking a field against one of chatapp.inputs' rules, with the limits
    of the app handling the request, worded as the service (and the API) word it."""

    def __init__(self, name: str, problem):
        self.name = name
        self.problem = problem

    def __call__(self, form, field) -> None:
        problem = self.problem(field.data)
        if problem:
            raise ValidationError(sentence(f"{self.name} {problem}"))


class LoginForm(Form):
    username = StringField("Username", validators=[InputRequired(), Length(max=LOGIN_USERNAME_MAX_LENGTH)])
    password = PasswordField("Password", validators=[InputRequired(), Length(max=LOGIN_PASSWORD_MAX_LENGTH)])


class RegisterForm(Form):
    username = StringField("Username", validators=[InputRequired(), Rule("username", inputs.username_problem)])
    password = PasswordField("Password", validators=[InputRequired(), Rule("password", inputs.password_problem)])
    confirm = PasswordField(
        "Repeat password",
        validators=[InputRequired(), EqualTo("password", message="The passwords do not match.")],
    )


class PasswordChangeForm(Form):
    current_password = PasswordField(
        "Current password", validators=[InputRequired(), Length(max=LOGIN_PASSWORD_MAX_LENGTH)]
    )
    new_password = PasswordField(
        "New password", validators=[InputRequired(), Rule("password", inputs.password_problem)]
    )
    confirm_new_password = PasswordField(
        "Repeat new password",
        validators=[InputRequired(), EqualTo("new_password", message="The new passwords do not match.")],
    )
    revoke_tokens = BooleanField("Also revoke all my API tokens")


class DeleteAccountForm(Form):
    delete_password = PasswordField(
        "Your password", validators=[InputRequired(), Length(max=LOGIN_PASSWORD_MAX_LENGTH)]
    )


class RenameForm(Form):
    title = StringField("Title", validators=[InputRequired(), Rule("title", inputs.title_problem)])


class MessageForm(Form):
    content = TextAreaField("Message", validators=[InputRequired(), Rule("content", inputs.content_problem)])


class ChatSettingsForm(Form):
    """A conversation's model and system prompt. The model's choices are set by the view
    (the engine's list); chatapp.chat.catalog checks the one sent, as the API does."""

    model = SelectField("Model", choices=[], validate_choice=False)
    system_prompt = TextAreaField(
        "System prompt", default="", validators=[Rule("system_prompt", inputs.system_prompt_problem)]
    )


class NewChatForm(ChatSettingsForm):
    """The first message of a conversation, which creates it, with its settings."""

    content = TextAreaField("Message", validators=[InputRequired(), Rule("content", inputs.content_problem)])


class TokenForm(Form):
    name = StringField("Token name", default="", validators=[Rule("name", inputs.token_name_problem)])


def add_error(form: FlaskForm, error: AppError, default_field: str) -> None:
    """Show a service's error next to the field it names (or the form's main field)."""
    field = getattr(form, error.field or "", None) or getattr(form, default_field)
    field.errors = [*field.errors, sentence(error.message)]


def sentence(message: str) -> str:
    """Service messages are API-style ("title must be ..."); pages show sentences."""
    message = message[:1].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."
