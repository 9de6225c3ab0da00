"""The durable event log (SQLAlchemy Core over SQLite or Postgres)."""

from ._info import ChannelInfo, Retention
from ._store import EventLog, Pending

__all__ = ["ChannelInfo", "EventLog", "Pending", "Retention"]
