"""trioq: a distributed job queue on Trio.

The public surface; everything else lives in private modules below.
"""

from .broker.config import BrokerConfig
from .broker.server import Broker, BrokerHandle
from .client import Client
from .errors import (
    BrokerShuttingDown,
    ConnectError,
    ConnectionLost,
    ErrorCode,
    JobNotFound,
    ProtocolError,
    RemoteError,
    StoreError,
    TrioqError,
)
from .job import Job, JobSpec, JobState
from .worker.registry import Fatal, list_tasks, register_task, task, unregister_task
from .worker.runner import JobContext, Worker

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerConfig",
    "BrokerHandle",
    "BrokerShuttingDown",
    "Client",
    "ConnectError",
    "ConnectionLost",
    "ErrorCode",
    "Fatal",
    "Job",
    "JobContext",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "ProtocolError",
    "RemoteError",
    "StoreError",
    "TrioqError",
    "Worker",
    "list_tasks",
    "register_task",
    "task",
    "unregister_task",
]
