"""Default values of every tunable, one line of reason each."""

from __future__ import annotations

#: Key prefix of every key and channel redisbus writes.
KEY_PREFIX = "rb"
#: Redis used when no URL is given and REDISBUS_URL is unset.
URL = "redis://127.0.0.1:6379/0"
#: Namespace used when none is given and REDISBUS_NAMESPACE is unset.
NAMESPACE = "default"
#: Blob chunk size: big enough to amortise round trips, far below Redis's 512 MB value limit.
CHUNK_SIZE = 4 * 1024 * 1024
#: Byte alignment of each tensor inside the blob (covers every dtype and SIMD loads).
ALIGNMENT = 64
#: Number of committed versions kept whole; older ones get a grace expiry.
KEEP_VERSIONS = 3
#: Seconds an evicted version stays readable, so a reader mid-pull can finish.
GRACE_SECONDS = 60.0
#: Seconds after which an uncommitted (pending) version counts as abandoned by a dead publisher.
PENDING_TIMEOUT_SECONDS = 600.0
#: Seconds between a worker's reads of ``latest`` when no notice arrives.
POLL_INTERVAL_SECONDS = 2.0
#: Seconds between worker heartbeats.
HEARTBEAT_SECONDS = 5.0
#: A worker reports an applied version once its listener is idle, or this many seconds after the apply at the
#: latest: the report's round trip stays off the path of the next version, when every worker pulls at once.
REPORT_DELAY_SECONDS = 0.2
#: A worker whose heartbeat is older than this is reported dead.
DEAD_AFTER_SECONDS = 30.0
#: Largest manifest accepted, in bytes (safetensors-style header cap).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: Largest blob accepted by a worker, in bytes.
MAX_BLOB_BYTES = 1 << 40
#: Most tensors a manifest may describe.
MAX_TENSORS = 1_000_000
#: Largest user-metadata payload, in bytes of msgpack.
MAX_METADATA_BYTES = 64 * 1024
#: Largest notice accepted, in bytes (notices are hints; they stay small).
MAX_NOTICE_BYTES = 1024
#: Socket connect / read timeout, seconds.
SOCKET_TIMEOUT_SECONDS = 10.0
#: Interval of redis-py's connection health checks, seconds.
HEALTH_CHECK_INTERVAL_SECONDS = 5.0
#: First reconnect delay, seconds (exponential, full jitter).
BACKOFF_BASE_SECONDS = 0.05
#: Largest reconnect delay, seconds.
BACKOFF_CAP_SECONDS = 2.0
#: Versions up to this size reach a worker in one round trip after their notice (manifest and chunks together).
ONE_TRIP_PULL_BYTES = 16 * 1024 * 1024
#: ... and in at most this many chunks: a notice's chunk size is unverified until the manifest arrives.
ONE_TRIP_MAX_CHUNKS = 64
#: Times a reader retries with ``latest`` after losing a race with garbage collection.
GC_RACE_RETRIES = 5
#: Longest a publisher ``WAIT``s for its replicas before it commits anyway, seconds.
WAIT_TIMEOUT_SECONDS = 2.0
#: After a read replica failed to answer, a worker pulls from the primary for this long, seconds.
REPLICA_RETRY_SECONDS = 30.0
