"""The web forms. Each carries a CSRF token; the services hold the real rules (same as the API)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField, TextAreaField
from wtforms.validators import EqualTo, InputRequired, Length

from chatapp.chat.services import CONTENT_MAX, TITLE_MAX
from chatapp.errors import AppError


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[InputRequired(), Length(max=200)])
    password = PasswordField("Password", validators=[InputRequired(), Length(max=1000)])


class RegisterForm(FlaskForm):
    username = StringField("Username", validators=[InputRequired(), Length(max=40)])
    password = PasswordField("Password", validators=[InputRequired()])
    confirm = PasswordField(
        "Repeat password",
        validators=[InputRequired(), EqualTo("password", message="The passwords do not match.")],
    )


class RenameForm(FlaskForm):
    title = StringField("Title", validators=[InputRequired(), Length(max=TITLE_MAX)])


class MessageForm(FlaskForm):
    content = TextAreaField("Message", validators=[InputRequired(), Length(max=CONTENT_MAX)])


class TokenForm(FlaskForm):
    name = StringField("Token name", validators=[Length(max=100)])


def add_error(form: FlaskForm, error: AppError, default_field: str) -> None:
    """Show a service's error next to the field it names (or the form's main field)."""
    field = getattr(form, error.field or "", None) or getattr(form, default_field)
    field.errors = [*field.errors, sentence(error.message)]


def sentence(message: str) -> str:
    """Service messages are API-style ("title must be ..."); pages show sentences."""
    message = message[:1].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."
