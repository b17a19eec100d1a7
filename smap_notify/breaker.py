"""A circuit breaker (closed, open, half-open). Pure: the caller passes the time."""

from __future__ import annotations

import attrs


@attrs.define
class CircuitBreaker:
    """Stops calling a failing dependency for ``reset_after`` seconds after
    ``failure_threshold`` consecutive failures, then lets one trial call through."""

    failure_threshold: int = 3
    reset_after: float = 5.0
    state: str = "closed"  # closed, open, half_open
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def allow(self, now: float) -> bool:
        """May a call go ahead now?"""
        if self.state == "closed":
            return True
        if self.state == "open" and now - self.opened_at >= self.reset_after:
            self.state = "half_open"
            self.trial_in_flight = False
        if self.state == "half_open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def retry_now(self) -> None:
        """Other evidence says the dependency is back: let the next call through."""
        if self.state == "open":
            self.state = "half_open"
            self.trial_in_flight = False

    def record_success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.trial_in_flight = False

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self.trial_in_flight = False
        if self.state == "half_open" or self.failures >= self.failure_threshold:
            self.state = "open"
            self.opened_at = now
