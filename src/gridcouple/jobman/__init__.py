"""The job manager: a small HTTPS+JSON server that lets authorised partners start jobs and
application servers on this site, within ``max_jobs``, each in its own working directory.

``gridcouple jobman serve`` runs it (:mod:`gridcouple.jobman.server`); the ``jobmanager``
backend (:mod:`gridcouple.backends.jobmanager`) is its client. This package's ``__init__``
imports nothing heavy: the configuration reads :mod:`gridcouple.jobman.settings`.
"""
