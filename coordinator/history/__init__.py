"""History at the coordinator: users' versions over time, legal holds, retention GC, the audit log and
evidence exports."""
