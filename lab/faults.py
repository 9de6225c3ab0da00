"""The faults the lab injects from outside, each bounded in time and always undone.

A fault runs in cycles during a run's fault window (after a warm-up, before a quiet
end): it picks its next victim in turn (host, publisher, subscriber), applies the
fault, waits, undoes it, pauses, and starts again while a whole cycle still fits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from lab.fleet import Fleet
from lab.netns import Host, Network
from lab.proxy import ProxyControl
from lab.services import Service


class Target(Protocol):
    """What a fault acts on: the run's hosts, proxies, servers and processes."""

    network: Network
    proxies: dict[str, ProxyControl]
    services: dict[str, Service]
    fleet: Fleet

    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class Settings:
    """Durations of the faults, in seconds."""

    partition: float = 5.0
    delay: float = 0.05
    delay_for: float = 8.0
    stall: float = 5.0
    outage: float = 1.0  # a killed process or server stays down this long
    pause: float = 3.0  # between two cycles


Inject = Callable[[Target, Settings, float], None]


@dataclass(frozen=True)
class Fault:
    """A fault: its name, what it does, which transports it concerns."""

    name: str
    summary: str
    inject: Inject
    transports: Sequence[str] | None = None  # None: all

    def applies(self, transport: str) -> bool:
        return self.transports is None or transport in self.transports


def _cycles(until: float, length: float, pause: float) -> Iterator[int]:
    """Number the cycles of ``length`` seconds that fit before ``until`` (at least one).

    Two cycles are ``pause`` seconds apart.
    """
    cycle = 0
    while True:
        yield cycle
        cycle += 1
        if time.time() + pause + length > until:
            return
        time.sleep(pause)


def _none(target: Target, settings: Settings, until: float) -> None:
    time.sleep(max(0.0, until - time.time()))


def _partition(target: Target, settings: Settings, until: float) -> None:
    hosts = target.network.hosts
    for i in _cycles(until, settings.partition, settings.pause):
        host = hosts[i % len(hosts)]
        target.note(f"cut {host.name}'s link")
        target.network.cut(host)
        try:
            time.sleep(settings.partition)
        finally:
            target.network.restore(host)
        target.note(f"restored {host.name}'s link")


def _proxy_fault(
    on: Callable[[Settings], dict[str, object]],
    off: dict[str, object],
    hold: Callable[[Settings], float],
) -> Inject:
    def inject(target: Target, settings: Settings, until: float) -> None:
        hosts: list[Host] = target.network.hosts
        for i in _cycles(until, hold(settings), settings.pause):
            host = hosts[i % len(hosts)]
            control = target.proxies[host.name]
            command = on(settings)
            target.note(f"{host.name} proxy: {command}")
            control.send(**command)
            try:
                time.sleep(hold(settings))
            finally:
                if off:
                    control.send(**off)
            target.note(f"{host.name} proxy: {off or 'done'}")

    return inject


def _kill(role: str) -> Inject:
    def inject(target: Target, settings: Settings, until: float) -> None:
        names = target.fleet.names(role)
        for i in _cycles(until, settings.outage, settings.pause):
            name = names[i % len(names)]
            target.note(f"kill -9 {name}")
            target.fleet.kill9(name)
            time.sleep(settings.outage)
            target.fleet.restart(name)
            target.note(f"restarted {name}")

    return inject


def _restart(service: str) -> Inject:
    def inject(target: Target, settings: Settings, until: float) -> None:
        server = target.services[service]
        for _ in _cycles(until, settings.outage + 2, settings.pause):
            target.note(f"crash {service}")
            server.crash()
            time.sleep(settings.outage)
            server.start()
            target.note(f"{service} is back")

    return inject


REDIS = ("redis", "redis-stream")

FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in [
        Fault("none", "no fault (baseline)", _none),
        Fault("partition", "a host's veth down for 5 s, then up", _partition),
        Fault(
            "delay",
            "50 ms added each way on a host's connections, 8 s",
            _proxy_fault(lambda s: {"delay": s.delay}, {"delay": 0.0}, lambda s: s.delay_for),
        ),
        Fault(
            "stall",
            "a host's connections pass nothing for 5 s",
            _proxy_fault(lambda s: {"stall": True}, {"stall": False}, lambda s: s.stall),
        ),
        Fault(
            "sever",
            "a host's open connections reset at once",
            _proxy_fault(lambda s: {"sever": True}, {}, lambda s: 0.0),
        ),
        Fault("kill-publisher", "kill -9 of a publisher, restarted 1 s later", _kill("publisher")),
        Fault(
            "kill-subscriber",
            "kill -9 of a subscriber, restarted 1 s later; it resumes from its last event",
            _kill("subscriber"),
        ),
        Fault(
            "redis-restart", "the lab's Redis killed, started 1 s later", _restart("redis"), REDIS
        ),
        Fault(
            "nats-restart", "the lab's NATS killed, started 1 s later", _restart("nats"), ("nats",)
        ),
        Fault(
            "postgres-restart",
            "the lab's Postgres crashed (immediate shutdown), started 1 s later",
            _restart("postgres"),
        ),
    ]
}
