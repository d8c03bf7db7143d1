"""Alembic revisions of dicom-router (``<rev>_<slug>.py``; Alembic skips this file)."""
