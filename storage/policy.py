"""The retry policy of jobs and sends."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from storage.common import check_int, check_seconds

__all__ = ["QueuePolicy"]


def _backoff(attempts: int, base: float, cap: float) -> dt.timedelta:
    # attempts >= 1 failures so far: base, 2 base, 4 base, ... capped.
    exponent = min(max(attempts - 1, 0), 60)
    return dt.timedelta(seconds=min(cap, base * 2.0**exponent))


@dataclass(frozen=True)
class QueuePolicy:
    """Retry policy of jobs and sends.

    Parameters
    ----------
    max_attempts : int
        Claims a job gets before it is ``failed`` (default 3).
    retry_base_seconds, retry_cap_seconds : float
        Job back-off after the n-th failed attempt: ``min(cap, base * 2**(n-1))``.
    send_retry_base_seconds, send_retry_cap_seconds : float
        The same for sends.
    send_max_attempts : int or None
        Failed tries after which a send is ``failed``; ``None`` (default) retries forever.
    """

    max_attempts: int = 3
    retry_base_seconds: float = 30.0
    retry_cap_seconds: float = 3600.0
    send_retry_base_seconds: float = 30.0
    send_retry_cap_seconds: float = 3600.0
    send_max_attempts: int | None = None

    def __post_init__(self) -> None:
        check_int("max_attempts", self.max_attempts, minimum=1)
        for name in (
            "retry_base_seconds",
            "retry_cap_seconds",
            "send_retry_base_seconds",
            "send_retry_cap_seconds",
        ):
            check_seconds(name, getattr(self, name))
        if self.retry_cap_seconds < self.retry_base_seconds:
            raise ValueError(
                f"retry_cap_seconds ({self.retry_cap_seconds}) must be >= "
                f"retry_base_seconds ({self.retry_base_seconds})"
            )
        if self.send_retry_cap_seconds < self.send_retry_base_seconds:
            raise ValueError(
                f"send_retry_cap_seconds ({self.send_retry_cap_seconds}) must be >= "
                f"send_retry_base_seconds ({self.send_retry_base_seconds})"
            )
        if self.send_max_attempts is not None:
            check_int("send_max_attempts", self.send_max_attempts, minimum=1)

    def job_backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next try of a job that has failed ``attempts`` times."""
        return _backoff(attempts, self.retry_base_seconds, self.retry_cap_seconds)

    def send_backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next try of a send that has failed ``attempts`` times."""
        return _backoff(attempts, self.send_retry_base_seconds, self.send_retry_cap_seconds)
