"""File-level capture of user layers: a live directory tree (a home directory, a profile) kept as
versions of ``user/NAME/...``, with the software timeline and restores that keep today's data.

``classify`` sorts files into apps, config and data; ``walk`` reads a live tree's names and stats;
``index`` keeps what lets a re-capture skip unchanged files; ``engine`` makes a version; ``timeline``
says what changed per class and which apps came and went; ``safedir`` writes under a directory
without ever leaving it; ``restore`` brings chosen classes back; ``watch`` captures on change;
``backend`` runs captures here or in the daemon that holds the store.
"""
