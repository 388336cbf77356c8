"""Models: which models the bot engine offers."""

from chatapp.api.blueprint import api_blueprint
from chatapp.api.docs import error_responses
from chatapp.api.schemas import ModelList
from chatapp.chat import catalog
from chatapp.db import transaction

blp = api_blueprint("models", "Models the bot can answer with", authenticated=True)


@blp.get("/models")
@blp.response(200, ModelList)
@error_responses(blp, 401, 503)
@transaction("none")  # may ask the model server (cached): holds no connection meanwhile
def list_models():
    """List the models a conversation can choose; 503 if the model server cannot say."""
    return {"items": catalog.list_models()}
