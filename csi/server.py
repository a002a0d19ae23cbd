"""The ``flotilla`` process: gRPC server, per-RPC interceptor, signals, modes."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import grp
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc

from csi import DEFAULT_DRIVER_NAME, __version__, wiring
from csi.config import DEFAULT_STATE_DIR, Config, load_config
from csi.errors import FlotillaError, InvalidArgument, status_code
from csi.kube.agent import NodeAgent
from csi.locks import KeyedTryLock
from csi.metrics import Metrics
from csi.system import System

log = logging.getLogger("flotilla")

#: request fields worth a log line; secrets and capabilities are never logged
LOGGED_FIELDS = ("name", "volume_id", "snapshot_id", "source_volume_id", "staging_target_path",
                 "target_path", "volume_path", "starting_token")
MUTED_METHODS = frozenset({"Probe", "NodeGetCapabilities", "GetPluginInfo",
                           "GetPluginCapabilities", "ControllerGetCapabilities"})
DRAIN_SECONDS = 60.0


#: characters a text log line must not carry raw: each event stays one line whatever a
#: caller put into a name or path (log injection)
_LINE_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(32), 0x7F, 0x85)} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
    0x2028: "\\u2028", 0x2029: "\\u2029"}


class TextFormatter(logging.Formatter):
    """The text format, one line per event: control characters are escaped (a
    traceback too stays on its line)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_LINE_ESCAPES)


def logfmt_value(value: str) -> str:
    """A field value as it appears in a text log line: quoted when it has spaces, quotes,
    '=' or control characters, so ``k=v`` pairs cannot be forged."""
    if value and not any(c in value for c in ' "=\\') and value.isprintable():
        return value
    return json.dumps(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def request_fields(request: Any) -> dict[str, str]:
    fields = {}
    for name in LOGGED_FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            fields[name] = value
    return fields


class Undecodable:
    """What the request deserializer gives for bytes that are not the method's message:
    the call answers INVALID_ARGUMENT (a raising deserializer makes grpcio answer
    INTERNAL and keep memory for every such request)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def safe_deserializer(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if parse is None:
            return data
        try:
            return parse(data)
        except Exception as err:  # DecodeError, or anything the parser raises on bad bytes
            return Undecodable(type(err).__name__)

    return deserialize


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    InterceptorBase = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    InterceptorBase = grpc.ServerInterceptor


class RpcInterceptor(InterceptorBase):
    """One place for: error translation, one log line per RPC, the latency histogram."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.in_flight = 0
        self._lock = threading.Lock()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code = grpc.StatusCode.OK
            message = ""
            with self._lock:
                self.in_flight += 1
            try:
                if isinstance(request, Undecodable):
                    raise InvalidArgument(f"the request body is not a valid {method} "
                                          f"request message ({request.reason})")
                return inner(request, context)
            except FlotillaError as err:
                code, message = status_code(err), str(err)
                context.abort(code, message)
            except Exception as err:
                if isinstance(err, grpc.RpcError) or type(err).__name__ == "_AbortError":
                    code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
                    raise
                code, message = grpc.StatusCode.INTERNAL, f"internal error: {err}"
                log.exception("%s failed unexpectedly", method)
                context.abort(code, message)
            finally:
                elapsed = time.monotonic() - start
                with self._lock:
                    self.in_flight -= 1
                if self.metrics is not None:
                    self.metrics.observe(method, code.name, elapsed)
                fields = request_fields(request)
                fields["ms"] = f"{elapsed * 1000:.1f}"
                if message:
                    fields["error"] = message
                level = logging.DEBUG if method in MUTED_METHODS and code == grpc.StatusCode.OK \
                    else logging.INFO
                log.log(level, "%s %s %s", method, code.name,
                        " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items()),
                        extra={"fields": {"method": method, "code": code.name, **fields}})

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flotilla", description="Flotilla CSI driver")
    p.add_argument("--mode", choices=("all", "controller", "node"), default="all",
                   help="services to run (default: all)")
    p.add_argument("--endpoint", default="unix:///run/flotilla/csi.sock",
                   help="gRPC endpoint, unix:///PATH (default: %(default)s)")
    p.add_argument("--node-id", default=os.uname().nodename,
                   help="this node's id (default: the host name)")
    p.add_argument("--pool-config", default=None,
                   help="YAML pool configuration (default: the embedded default pool)")
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    p.add_argument("--metrics-address", default=None, help="HOST:PORT for /metrics")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help="node state and scratch directory (default: %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--socket-group", default=None,
                   help="group (name or numeric id) allowed to use the socket (mode 0660 "
                        "instead of 0600), e.g. the sidecars' group when the driver runs "
                        "as root and they do not")
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    k = p.add_argument_group("distributed mode (--mode controller / node)")
    k.add_argument("--kubeconfig", default=None,
                   help="kubeconfig file (default: in-cluster, else $KUBECONFIG / ~/.kube)")
    k.add_argument("--kube-timeout", type=float, default=45.0,
                   help="seconds the controller waits for a node agent before answering "
                        "ABORTED (retryable); keep it below the sidecars' --timeout "
                        "(default: %(default)s)")
    k.add_argument("--capacity-interval", type=float, default=30.0,
                   help="seconds between the node agent's capacity reports "
                        "(default: %(default)s)")
    p.add_argument("--version", action="version", version=f"flotilla {__version__}")
    return p.parse_args(argv)


def socket_path(endpoint: str) -> str | None:
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://"):]
    if endpoint.startswith("unix:"):
        return endpoint[len("unix:"):]
    return None


class Driver:
    """A configured, running driver: pools started, gRPC server serving."""

    def __init__(self, args: argparse.Namespace, config: Config,
                 system: System | None = None) -> None:
        self.args = args
        self.config = config
        self.system = system or System()
        self.parts = wiring.build(args, config, self.system)
        self.pools = self.parts.pools
        self.metrics = self.parts.metrics
        self.backups = self.parts.backups
        self.kube_state = self.parts.kube_state
        self.agent: NodeAgent | None = None
        self.interceptor = RpcInterceptor(self.metrics)
        self.server: grpc.Server | None = None

    def start(self) -> None:
        os.makedirs(self.args.state_dir, exist_ok=True)
        if self.kube_state is not None:
            self.kube_state.start()
        self.pools.start()  # a pool that cannot start is retried; the others serve
        locks = KeyedTryLock()
        if self.args.mode == "node":
            self.agent = wiring.node_agent(self.args, self.parts, locks)
            self.agent.start()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.args.workers),
                             interceptors=[self.interceptor])
        wiring.add_services(server, self.args, self.config, self.parts, self.system, locks)
        path = socket_path(self.args.endpoint)
        if path is not None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            old = os.umask(0o177)
            try:
                server.add_insecure_port(f"unix://{path}")
                server.start()
            finally:
                os.umask(old)
            self._secure_socket(path)
        else:
            server.add_insecure_port(self.args.endpoint)
            server.start()
        self.server = server
        if self.args.metrics_address:
            self.metrics.serve(self.args.metrics_address)
        failed = self.pools.failures()
        log.info("flotilla %s serving %s mode=%s node=%s pools=%s%s", __version__,
                 self.args.endpoint, self.args.mode, self.args.node_id,
                 ",".join(f"{p.name}({p.type})" for p in self.pools),
                 f" failed={','.join(failed)} (retried in the background)" if failed else "")

    def _secure_socket(self, path: str) -> None:
        if self.args.socket_group:
            group = self.args.socket_group
            os.chown(path, -1, int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)

    def stop(self, grace: float = DRAIN_SECONDS) -> None:
        """Refuse new calls, wait for in-flight ones, release the pools."""
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self.backups is not None:
            self.backups.stop()
        if self.kube_state is not None:
            self.kube_state.stop()
        self.pools.stop()
        path = socket_path(self.args.endpoint)
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_format, args.log_level.upper())
    try:
        config = load_config(args.pool_config, args.state_dir)
        driver = Driver(args, config)
        driver.start()
    except FlotillaError as err:
        log.error("cannot start: %s", err)
        return 2
    stopping = threading.Event()
    # SIGUSR1 writes every thread's stack to stderr: what a stuck driver is waiting for
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: draining in-flight calls", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Python runs a signal handler in the main thread, but the kernel may deliver the
    # signal to any of gRPC's threads, which does not wake a main thread blocked on a lock
    # with no timeout: SIGTERM then went unhandled for good (a flaky teardown in CI).
    # Waking every second lets the handler run.
    while not stopping.wait(1.0):
        pass
    driver.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
