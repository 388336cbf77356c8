"""The web forms. Each carries a CSRF token; the services hold the real rules (same as the API)."""

from __future__ import annotations

from flask import request
from flask_wtf import FlaskForm
from flask_wtf.form import _Auto
from werkzeug.datastructures import CombinedMultiDict
from wtforms import PasswordField, StringField, TextAreaField
from wtforms.validators import EqualTo, InputRequired, Length

from chatapp.chat.services import CONTENT_MAX, TITLE_MAX
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


class LoginForm(Form):
    username = StringField("Username", validators=[InputRequired(), Length(max=200)])
    password = PasswordField("Password", validators=[InputRequired(), Length(max=1000)])


class RegisterForm(Form):
    username = StringField("Username", validators=[InputRequired(), Length(max=40)])
    password = PasswordField("Password", validators=[InputRequired()])
    confirm = PasswordField(
        "Repeat password",
        validators=[InputRequired(), EqualTo("password", message="The passwords do not match.")],
    )


class RenameForm(Form):
    title = StringField("Title", validators=[InputRequired(), Length(max=TITLE_MAX)])


class MessageForm(Form):
    content = TextAreaField("Message", validators=[InputRequired(), Length(max=CONTENT_MAX)])


class TokenForm(Form):
    name = StringField("Token name", default="", validators=[Length(max=100)])


def add_error(form: FlaskForm, error: AppError, default_field: str) -> None:
    """Show a service's error next to the field it names (or the form's main field)."""
    field = getattr(form, error.field or "", None) or getattr(form, default_field)
    field.errors = [*field.errors, sentence(error.message)]


def sentence(message: str) -> str:
    """Service messages are API-style ("title must be ..."); pages show sentences."""
    message = message[:1].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."
