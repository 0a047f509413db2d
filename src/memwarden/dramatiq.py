"""``broker.add_middleware(memwarden.dramatiq.MemoryWarden(**options))`` (needs dramatiq)."""

from memwarden.integrations.dramatiq import DramatiqReload, MemoryWarden

__all__ = ["DramatiqReload", "MemoryWarden"]
