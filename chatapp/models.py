"""Every model, importable from one place (the shell, migrations, tests)."""

from chatapp.auth.models import ApiToken, LoginSession, User
from chatapp.chat.models import Conversation, Message, Role, Status

__all__ = ["ApiToken", "Conversation", "LoginSession", "Message", "Role", "Status", "User"]
