"""``broker.add_middlewares(memwarden.taskiq.MemoryWarden(**options))`` (needs taskiq)."""

from memwarden.integrations.taskiq import MemoryWarden, loss_notes

__all__ = ["MemoryWarden", "loss_notes"]
