"""The part of the Kubernetes API Flotilla uses, behind a small interface.

:class:`KubeApi` is what the informer, the controller's pool and the node agent call;
:class:`ClientKubeApi` implements it with the ``kubernetes`` client. Unit tests swap in
an in-memory implementation. Objects are plain dicts (the JSON of the resource).
"""

from __future__ import annotations

import abc
import datetime
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from csi import __version__
from csi.kube import EVENT_NAMESPACE, GROUP, KIND_OF, VERSION

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class Conflict(Exception):
    """The object exists already (create) or changed meanwhile (a guarded patch)."""


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class ApiUnavailable(Exception):
    """The API server could not be reached or answered with a server error."""


class KubeApi(abc.ABC):
    """Cluster-scoped custom objects of :data:`csi.kube.GROUP`, plus Events."""

    @abc.abstractmethod
    def list(self, plural: str, label_selector: str = "") -> tuple[list[Obj], str]:
        """All objects and the list's resourceVersion."""

    @abc.abstractmethod
    def watch(self, plural: str, label_selector: str, resource_version: str,
              timeout: int) -> Iterator[tuple[str, Obj]]:
        """(ADDED|MODIFIED|DELETED|BOOKMARK, object) events after ``resource_version``.

        Ends after ``timeout`` seconds or when :meth:`close` is called. Raises Gone.
        """

    @abc.abstractmethod
    def get(self, plural: str, name: str) -> Obj | None: ...

    @abc.abstractmethod
    def create(self, plural: str, body: Obj) -> Obj:
        """Raises Conflict when the name is taken."""

    @abc.abstractmethod
    def patch(self, plural: str, name: str, patch: Obj, status: bool = False) -> Obj | None:
        """JSON merge patch of the object (or its status subresource); None when gone.

        A ``metadata.resourceVersion`` in the patch makes it conditional (Conflict).
        """

    @abc.abstractmethod
    def delete(self, plural: str, name: str) -> None:
        """Request deletion (finalizers may keep it a while); gone already is fine."""

    @abc.abstractmethod
    def event(self, obj: Obj, reason: str, message: str, warning: bool = False) -> None:
        """Record an Event about ``obj`` (best effort: failures are logged)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Abort open watches."""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClientKubeApi(KubeApi):
    """:class:`KubeApi` over the ``kubernetes`` Python client."""

    def __init__(self, kubeconfig: str | None = None, component: str = "flotilla",
                 host: str = "") -> None:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        if kubeconfig:
            cfg = client.Configuration()
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg)
        else:
            try:
                cfg = client.Configuration()
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=cfg)
            except config.ConfigException:
                cfg = client.Configuration()
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    client_configuration=cfg)
        self._client = client.ApiClient(cfg)
        self._client.user_agent = f"flotilla/{__version__} ({component})"
        self._custom = client.CustomObjectsApi(self._client)
        self._core = client.CoreV1Api(self._client)
        self._rest = ApiException
        self.component = component
        self.host = host
        self._open: set[Any] = set()
        self._lock = threading.Lock()

    # ---- helpers --------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=timeout, **kwargs)
        except self._rest as err:
            if err.status == 409:
                raise Conflict(str(err.reason)) from None
            if err.status is None or err.status >= 500 or err.status == 429:
                raise ApiUnavailable(f"API server: {err.status} {err.reason}") from None
            raise
        except (HTTPError, OSError) as err:
            raise ApiUnavailable(f"API server unreachable: {err}") from None

    # ---- KubeApi --------------------------------------------------------------------

    def list(self, plural: str, label_selector: str = "") -> tuple[list[Obj], str]:
        out = self._call(self._custom.list_cluster_custom_object, GROUP, VERSION, plural,
                         label_selector=label_selector)
        return list(out.get("items", [])), str(out["metadata"].get("resourceVersion", ""))

    def watch(self, plural: str, label_selector: str, resource_version: str,
              timeout: int) -> Iterator[tuple[str, Obj]]:
        from kubernetes.watch.watch import iter_resp_lines

        resp = self._call(self._custom.list_cluster_custom_object, GROUP, VERSION, plural,
                          label_selector=label_selector, watch=True,
                          resource_version=resource_version, allow_watch_bookmarks=True,
                          timeout_seconds=timeout, _preload_content=False,
                          timeout=timeout + 30)
        with self._lock:
            self._open.add(resp)
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resourceVersion too old"))
                    raise ApiUnavailable(f"watch error: {obj.get('message')}")
                yield kind, obj
        except (OSError, ValueError, AttributeError) as err:
            # a closed or broken stream: the caller watches again from its last version
            log.debug("watch of %s ended: %s", plural, err)
        finally:
            with self._lock:
                self._open.discard(resp)
            resp.close()
            resp.release_conn()

    def get(self, plural: str, name: str) -> Obj | None:
        try:
            obj: Obj = self._call(self._custom.get_cluster_custom_object, GROUP, VERSION,
                                  plural, name)
        except self._rest as err:
            if err.status == 404:
                return None
            raise
        return obj

    def create(self, plural: str, body: Obj) -> Obj:
        obj: Obj = self._call(self._custom.create_cluster_custom_object, GROUP, VERSION,
                              plural, body)
        return obj

    def patch(self, plural: str, name: str, patch: Obj, status: bool = False) -> Obj | None:
        fn = (self._custom.patch_cluster_custom_object_status if status
              else self._custom.patch_cluster_custom_object)
        # the client picks the merge-patch content type for a dict body
        try:
            obj: Obj = self._call(fn, GROUP, VERSION, plural, name, patch,
                                  _content_type="application/merge-patch+json")
        except self._rest as err:
            if err.status == 404:
                return None
            raise
        return obj

    def delete(self, plural: str, name: str) -> None:
        try:
            self._call(self._custom.delete_cluster_custom_object, GROUP, VERSION, plural, name)
        except self._rest as err:
            if err.status != 404:
                raise

    def event(self, obj: Obj, reason: str, message: str, warning: bool = False) -> None:
        from kubernetes import client

        meta = obj.get("metadata", {})
        plural = next((p for p, k in KIND_OF.items() if k == obj.get("kind")), "")
        stamp = datetime.datetime.now(datetime.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta.get('name', 'flotilla')}.{uuid.uuid4().hex[:12]}",
                namespace=EVENT_NAMESPACE),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion"), kind=obj.get("kind"),
                name=meta.get("name"), uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion")),
            reason=reason, message=message[:1024], type="Warning" if warning else "Normal",
            first_timestamp=stamp, last_timestamp=stamp, count=1,
            source=client.V1EventSource(component=self.component, host=self.host or None),
            reporting_component=f"{GROUP}/{self.component}",
            reporting_instance=self.host or self.component,
        )
        try:
            self._call(self._core.create_namespaced_event, EVENT_NAMESPACE, body)
        except Exception as err:
            log.warning("cannot record event %s on %s %s: %s", reason, plural,
                        meta.get("name"), err)

    def close(self) -> None:
        with self._lock:
            open_now = list(self._open)
        for resp in open_now:
            try:
                resp.shutdown()
            except (AttributeError, OSError):
                resp.close()
