"""The fleet's certificate authority at the coordinator: the CA itself (ca.py), one-time join tokens
(tokens.py), revocations (revocation.py), the Enrollment service (service.py), the check of every
call's peer certificate (guard.py) and the commands that manage them (cli.py).

Embedded, everything lives under DATA/ca/, beside the store and not in it; with replicas, tokens,
revocations and assignments are PostgreSQL's (state.py) and only the CA stays in DATA/ca/: see
docs/design.md, "Fleet trust".
"""
