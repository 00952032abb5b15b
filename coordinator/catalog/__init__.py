"""The catalog at the coordinator: commits, tags and the event log behind Watch."""
