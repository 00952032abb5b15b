"""The daemon's HTTP server: versions' files and images' composite disks over GET and HEAD, with
ranges and validators. Routes and URL scheme: see app.py; the daemon calls ``start_http``."""
