"""Prometheus metrics: per-RPC latency histogram and per-pool gauges (read at scrape)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from csi.errors import FlotillaError
from csi.pools import PoolSet

log = logging.getLogger(__name__)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 120.0, 300.0)


class PoolCollector(Collector):
    """``flotilla_pool_*`` gauges, computed from each pool when scraped."""

    def __init__(self, pools: PoolSet) -> None:
        self.pools = pools

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "size": GaugeMetricFamily("flotilla_pool_size_bytes",
                                      "Physical size of the pool", labels=["pool", "type"]),
            "used": GaugeMetricFamily("flotilla_pool_used_bytes",
                                      "Physical bytes in use", labels=["pool", "type"]),
            "provisioned": GaugeMetricFamily("flotilla_pool_provisioned_bytes",
                                             "Sum of the sizes of the pool's volumes",
                                             labels=["pool", "type"]),
            "available": GaugeMetricFamily("flotilla_pool_available_bytes",
                                           "Largest volume the pool's limits allow now",
                                           labels=["pool", "type"]),
            "volumes": GaugeMetricFamily("flotilla_pool_volumes", "Volumes in the pool",
                                         labels=["pool", "type"]),
            "snapshots": GaugeMetricFamily("flotilla_pool_snapshots",
                                           "Snapshots in the pool", labels=["pool", "type"]),
            "up": GaugeMetricFamily("flotilla_pool_up", "1 when the pool can serve",
                                    labels=["pool", "type"]),
            "started": GaugeMetricFamily(
                "flotilla_pool_started", "1 when the pool has started; 0 while its start "
                "fails (retried in the background)", labels=["pool", "type"]),
        }
        attempts = GaugeMetricFamily(
            "flotilla_pool_start_failed_attempts", "Consecutive failed start attempts of "
            "the pool (0 once it has started)", labels=["pool", "type"])
        extra: dict[str, GaugeMetricFamily] = {}
        failures = self.pools.failures()
        for pool in self.pools.all():
            labels = [pool.name, pool.type]
            failure = failures.get(pool.name)
            families["started"].add_metric(labels, 0 if failure else 1)
            attempts.add_metric(labels, failure.attempts if failure else 0)
            if failure is not None:  # no I/O on a pool that did not start
                families["up"].add_metric(labels, 0)
                continue
            try:
                pool.check()
                cap = pool.capacity()
            except (FlotillaError, OSError) as err:
                log.warning("metrics: pool %s unavailable: %s", pool.name, err)
                families["up"].add_metric(labels, 0)
                continue
            families["up"].add_metric(labels, 1)
            for key in ("size", "used", "provisioned", "available", "volumes", "snapshots"):
                families[key].add_metric(labels, float(getattr(cap, key)))
            for name, value in cap.extra.items():
                fam = extra.setdefault(name, GaugeMetricFamily(
                    name, f"{name} (pool-specific)", labels=["pool", "type"]))
                fam.add_metric(labels, value)
        yield from families.values()
        yield attempts
        yield from extra.values()


class Metrics:
    def __init__(self, driver_name: str) -> None:
        self.driver_name = driver_name
        self.registry = CollectorRegistry()
        self.operations = Histogram(
            "csi_plugin_operations_seconds",
            "Duration of CSI operations served by the plugin",
            ["driver_name", "method_name", "grpc_status_code"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def add_pools(self, pools: PoolSet) -> None:
        """Export the ``flotilla_pool_*`` series of ``pools``."""
        self.registry.register(PoolCollector(pools))

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.operations.labels(self.driver_name, method, code).observe(seconds)

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",  # noqa: S104
                          registry=self.registry)
        log.info("metrics at http://%s/metrics", address)
