"""The threads password work runs on: bcrypt at cost 12 is ~0.25 s of CPU per hash and
releases the GIL, so the hashes of concurrent logins run in parallel, one thread per
core the process may use (more would only share the same cores), below the host's
priority and apart from the loop's default executor (see :mod:`eventstore.threads`).
"""

from __future__ import annotations

from typing import Final

from eventstore.threads import NicedThreads, cores

#: The process's password threads, shared by its dispatchers (threads are per process).
PASSWORD_THREADS: Final = NicedThreads("tiu-password", cores())
