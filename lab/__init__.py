"""A multi-host fault lab for broadcast_history (``scripts/lab``).

Three "hosts" are Linux network namespaces, each joined to the root namespace by a
veth pair. The root namespace runs the lab's own Redis, PostgreSQL (and NATS) servers
and, per host, a fault-injecting TCP proxy in front of them. Each host runs publisher
and subscriber processes of a small app that uses only the library's public API.
Faults are injected from outside (link cuts, delay and stalls in the proxies, kill -9,
server restarts), then a checker compares every process's records with the log.

Modules: ``netns`` (namespaces and veths), ``procs`` (child processes), ``services``
(Redis, Postgres, NATS), ``proxy`` (the TCP proxy and its control client), ``app``
(publisher and subscriber), ``faults`` (what is injected), ``checker`` (what must
hold), ``runner`` (the command line and the run loop).
"""
