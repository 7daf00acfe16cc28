"""Durable state of the node: SQLAlchemy models, the job queue and the file store.

Knows nothing of torch or of the DICOM network.
"""
