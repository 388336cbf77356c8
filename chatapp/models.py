"""Every model, importable from one place (the shell, migrations, tests)."""

from chatapp.auth.models import ApiToken, User
from chatapp.chat.models import Conversation, Message, Role, Status

__all__ = ["ApiToken", "Conversation", "Message", "Role", "Status", "User"]
