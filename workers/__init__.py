"""Forwarding workers: lease jobs from the dispatcher and send instances to destinations."""
