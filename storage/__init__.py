"""Durable state of the node: the database (jobs, studies, sends) and the file store.

``database``  engine, transactions, schema-version check, :func:`open_database` and the
              :class:`~storage.database.Database` handle (``db.jobs``, ``db.studies``,
              ``db.sends``)
``intake``    received instance → job: the one new / duplicate / replacement decision
``jobs``      the job queue: claim, lease, complete, fail, retry
``studies``   study rows, quiet-period due detection, report versions
``sends``     outbound C-STOREs and their retries
``policy``    :class:`~storage.policy.QueuePolicy`, the retry policy of jobs and sends
``models``    SQLAlchemy tables and :data:`~storage.models.SCHEMA_VERSION`
``filestore`` the durable file store
``errors``    :class:`~storage.errors.StorageError` and its subclasses
``common``    argument checks and row snapshots shared by the aggregates

Knows nothing of torch or of the DICOM network (never imports ``node`` or ``cascade``).
"""
