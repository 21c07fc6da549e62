"""The kubetune Python SDK: FineTuneJobs from a notebook or a script, on a cluster or locally.

from kubetune.client import Client
client = Client()                       # or Client(backend="local") on a laptop
job = client.submit("job.yaml")         # a YAML path, a manifest dict or a FineTuneJob model
for p in client.stream_progress(job.metadata.name):
    print(p.step, p.loss, p.eta)
client.artifacts(job.metadata.name).download("out/")
"""

from kubetune.client.errors import (
    AlreadyExists,
    ApiError,
    ClientError,
    Forbidden,
    JobFailed,
    NotFound,
    SpecInvalid,
    Unauthorized,
    Unreachable,
)
from kubetune.client.sdk import Client, JobArtifacts
from kubetune.client.storage import Downloaded, DownloadError

__all__ = [
    "AlreadyExists",
    "ApiError",
    "Client",
    "ClientError",
    "DownloadError",
    "Downloaded",
    "Forbidden",
    "JobArtifacts",
    "JobFailed",
    "NotFound",
    "SpecInvalid",
    "Unauthorized",
    "Unreachable",
]
