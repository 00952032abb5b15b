"""Who may read a layer, the one rule every server of the fleet applies (the coordinator's port and a
node's peer port; README "Who may do what"):

- os/ and app/ layers: every principal of the fleet;
- user/NAME/...: the user NAME (role user:NAME), an auditor, and a node NAME is assigned to.

Where assignments come from differs: the coordinator reads DATA/assignments.json, a node the copy its
heartbeat brings (cachepoint/trust/fleet_view.py). Also: which manifests a caller may be handed.
"""

from __future__ import annotations

from collections.abc import Callable

from cachepoint.trust.principal import Principal

USER_ROOT = "user/"
UsersOf = Callable[[str], frozenset[str]]  # node name -> users assigned to it
LayerFilter = Callable[[str], bool]


def owner_of(layer: str) -> str | None:
    """The user owning a layer, or None for os/ and app/ layers (= coordinator.history.users.owner_of)."""
    if not layer.startswith(USER_ROOT):
        return None
    parts = layer.split("/")
    return parts[1] if len(parts) >= 2 else None


def may_read_layer(principal: Principal, layer: str, users_of: UsersOf) -> bool:
    user = owner_of(layer)
    if user is None:
        return True
    return (
        principal.has("auditor")
        or any(r.kind == "user" and r.user == user for r in principal.roles)
        or (principal.has("node") and user in users_of(principal.name))
    )


def sees_everything(principal: Principal) -> bool:
    """Admins and auditors see every node's holdings and assignments (fleet listings)."""
    return principal.has("admin") or principal.has("auditor")
