"""Users and what belongs to them: a user NAME owns the layers ``user/NAME/...``; audit subjects about
the user are ``user/NAME`` (the user as a whole) or start with ``user/NAME/`` (a layer, a version)."""

from __future__ import annotations

from cachepoint.errors import InvalidInput, InvalidLayerName
from cachepoint.ids import validate_layer_name

USER_ROOT = "user/"
DEFAULT_LAYER = "home"  # the layer a file-level capture writes: user/NAME/home


def validate_user(user: str) -> str:
    """A user name is one layer-name segment (lowercase letters, digits, '.', '_', '-')."""
    if "/" in user:
        raise InvalidInput(f"user name {user!r}: one segment, without '/' (e.g. alice)")
    try:
        validate_layer_name(USER_ROOT + user)
    except InvalidLayerName as err:
        raise InvalidInput(
            f"user name {user!r}: up to 64 lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        ) from err
    return user


def user_subject(user: str) -> str:
    return USER_ROOT + user


def layer_prefix(user: str) -> str:
    return f"{USER_ROOT}{user}/"


def user_layer(user: str, layer: str) -> str:
    """``user/NAME/LAYER`` from a user and the part of the layer name after it (``home``)."""
    name = layer_prefix(validate_user(user)) + (layer or DEFAULT_LAYER)
    try:
        return validate_layer_name(name)
    except InvalidLayerName as err:
        raise InvalidInput(f"layer {layer!r} of user {user!r}: {err}") from err


def owner_of(layer: str) -> str | None:
    """The user owning a layer, or None for os/ and app/ layers."""
    if not layer.startswith(USER_ROOT):
        return None
    parts = layer.split("/")
    return parts[1] if len(parts) >= 2 else None


def is_about(subject: str, user: str) -> bool:
    own = user_subject(user)
    return subject == own or subject.startswith(own + "/")
