"""``rq worker -w memwarden.rq.Worker`` (or ``memwarden.rq.SimpleWorker``); needs rq.

RQ resolves ``-w a.b.C`` by importing the longest importable module prefix (``memwarden.rq``)
and taking the attribute, so these names must live right here.
"""

from memwarden.integrations.rq import SimpleWorker, WardenMixin, Worker, poison_reason

__all__ = ["SimpleWorker", "WardenMixin", "Worker", "poison_reason"]
