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

import json
import threading
import time
from typing import Any, cast

import kopf
from kubernetes import client
from urllib3.util.retry import Retry

from kubetune import metrics

DEFAULT_TIMEOUT = 30.0
# A guard against a runaway loop more than a pace: the API server's priority and fairness shares
# it out. 100/200 held a burst of 300 new jobs back (164 s of waits summed over the threads; the
# p95 from FineTuneJob to PyTorchJob 10.5 s, 6.2 s at 400/800 with no waits and no 429).
DEFAULT_QPS = 400.0
DEFAULT_BURST = 800  # the same in cli.py (which does not import this module: `kubetune run` starts fast)


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
        waited = self.bucket.take()
        if waited:
            metrics.API_THROTTLED.inc(waited)
        metrics.API_REQUESTS.labels(method).inc()
        response = super().call_api(method, url, header_params, body, post_params,
                                    _request_timeout=_request_timeout or self.timeout)
        if response.status == 429:
            retry = response.headers.get("Retry-After")
            delay = float(retry) if retry and retry.isdigit() else 1.0
            raise kopf.TemporaryError(f"The API server throttled {method} {url.split('?')[0]}; retrying in {delay:.0f}s",
                                      delay=delay)
        return response


class Requests:
    """The handlers' requests as plain JSON, under the names of the kubernetes client's methods.

    The client's typed APIs (`CoreV1Api`, `CustomObjectsApi` ...) validate every call's arguments
    with pydantic and load their models on first use: `CoreV1Api` alone imports about 250 model
    modules, 22 MiB that stay resident (80 MiB at the peak where no bytecode was compiled), for the
    eight requests the operator makes, whose answers it wants as wire dicts anyway. These send the
    same requests through the same `ApiClient` (auth, TLS, timeout, rate limit) and return the JSON;
    an answer outside 2xx raises the client's `ApiException`, as the typed methods do."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        _, url, headers, body, post = self.api.param_serialize(
            method, path, query_params=params, header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=body, post_params=post)
        data: bytes = response.read() or b""  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise client.ApiException.from_response(http_resp=response, body=data.decode("utf-8", "replace"), data=None)
        return json.loads(data) if data else None

    # core/v1 and batch/v1 -----------------------------------------------------------------

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", body=body))

    def read_namespaced_config_map(self, name: str, namespace: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}"))

    def delete_collection_namespaced_config_map(self, namespace: str, label_selector: str) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps", {"labelSelector": label_selector})

    def read_namespaced_pod(self, name: str, namespace: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}"))

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        rsp = self.request("GET", f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": label_selector})
        return cast(list[dict[str, Any]], rsp.get("items") or [])

    def list_namespaced_event(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        rsp = self.request("GET", f"/api/v1/namespaces/{namespace}/events", {"fieldSelector": field_selector})
        return cast(list[dict[str, Any]], rsp.get("items") or [])

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=body))

    def read_namespaced_job(self, name: str, namespace: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"))

    # custom resources ---------------------------------------------------------------------

    @staticmethod
    def _objects(group: str, version: str, namespace: str, plural: str) -> str:
        return f"/apis/{group}/{version}/namespaces/{namespace}/{plural}"

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", f"{self._objects(group, version, namespace, plural)}/{name}"))

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                      label_selector: str | None = None) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", self._objects(group, version, namespace, plural),
                                                 {"labelSelector": label_selector}))

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("POST", self._objects(group, version, namespace, plural), body=body))

    def create_cluster_custom_object(self, group: str, version: str, plural: str,
                                      body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("POST", f"/apis/{group}/{version}/{plural}", body=body))

    def replace_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                         body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("PUT", f"{self._objects(group, version, namespace, plural)}/{name}",
                                                 body=body))

    def patch_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                       body: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch."""
        return cast(dict[str, Any], self.request("PATCH", f"{self._objects(group, version, namespace, plural)}/{name}",
                                                 body=body, content_type="application/merge-patch+json"))

    def patch_namespaced_custom_object_status(self, group: str, version: str, namespace: str, plural: str, name: str,
                                              body: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the status subresource."""
        path = f"{self._objects(group, version, namespace, plural)}/{name}/status"
        return cast(dict[str, Any], self.request("PATCH", path, body=body,
                                                 content_type="application/merge-patch+json"))

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                        propagation_policy: str | None = None) -> None:
        self.request("DELETE", f"{self._objects(group, version, namespace, plural)}/{name}",
                     {"propagationPolicy": propagation_policy})
