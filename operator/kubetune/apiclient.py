"""The operator's Kubernetes client: every request with a timeout, under a client-side rate limit.

    common.RUNTIME.api = ApiClient(timeout=30, qps=100, burst=200)

kopf's own requests (watches, its annotations and finalizers) have kopf's timeouts
(`settings.networking`, `settings.watching`); this is the client of the handlers' requests.
A request that names no `_request_timeout` gets `timeout` seconds, so a black-holed
connection fails the reconcile (which kopf retries) instead of hanging a worker thread that
holds the object's lock (urllib3 retries a timed-out read once). The token bucket (client-go's
QPS and burst) spreads a burst of reconciles out instead of letting the API server answer 429;
a 429 it answers anyway becomes `kopf.TemporaryError` with the server's Retry-After, so the
reconcile comes back later (in a worker that holds no lock meanwhile) instead of counting as
an error.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import kopf
from kubernetes import client
from urllib3.util.retry import Retry

from kubetune import metrics

DEFAULT_TIMEOUT = 30.0
DEFAULT_QPS = 100.0
DEFAULT_BURST = 200


class TokenBucket:
    """`qps` requests a second on average, up to `burst` at once (qps <= 0: no limit)."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps, self.burst = qps, max(1, burst)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take a token, waiting for one if none is left; the seconds waited."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)  # the caller's token is reserved; later callers queue behind it
        return wait


class ApiClient(client.ApiClient):
    """A kubernetes `ApiClient` with a default timeout and a client-side rate limit."""

    def __init__(self, configuration: client.Configuration | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 qps: float = DEFAULT_QPS, burst: int = DEFAULT_BURST) -> None:
        configuration = configuration or client.Configuration.get_default_copy()
        # urllib3 would sleep out a 429's Retry-After in this thread (holding the object's lock),
        # and retry a timed-out read 3 times: once here; kopf retries the reconcile instead.
        configuration.retries = Retry(total=3, read=1, status=0, respect_retry_after_header=False)
        super().__init__(configuration)
        self.timeout = timeout
        self.bucket = TokenBucket(qps, burst)
        self.user_agent = "kubetune-operator"

    def call_api(self, method: str, url: str, header_params: Any = None, body: Any = None,
                 post_params: Any = None, _request_timeout: Any = None) -> Any:
        self.bucket.take()
        metrics.API_REQUESTS.labels(method).inc()
        response = super().call_api(method, url, header_params, body, post_params,
                                    _request_timeout=_request_timeout or self.timeout)
        if response.status == 429:
            retry = response.headers.get("Retry-After")
            delay = float(retry) if retry and retry.isdigit() else 1.0
            raise kopf.TemporaryError(f"The API server throttled {method} {url.split('?')[0]}; retrying in {delay:.0f}s",
                                      delay=delay)
        return response
