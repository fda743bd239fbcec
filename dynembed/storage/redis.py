"""RedisStore: rows in Redis, a store that several machines share.

Rows of a table are spread over ``shards`` Redis hashes named ``{namespace}:{{shard}}``
(the braces are a Redis Cluster hash tag, so shards land on different cluster nodes while
each hash stays on one). A batch becomes one pipelined HMGET / HSET / HDEL per shard it
touches, in a MULTI/EXEC transaction on a standalone server, so it applies whole or not at
all (Redis does not roll back a command that fails inside EXEC, which only a key of another
type written into the namespace by another program causes). Redis Cluster has no
transactions across nodes: there a failed batch may be partly written; writes are
idempotent, and a table never drops rows from memory until the write that holds them
succeeded, so a retry (or the next eviction) completes it.

Transient errors (connection refused or reset, timeouts) are retried with exponential backoff
by redis-py's own ``Retry`` (around the cluster pipeline too, which itself retries without
waiting), a bounded number of times, then raise
:class:`~dynembed.errors.StoreUnavailableError`. The namespace's description record holds
dim, optimizer width and ``shards``; a store opened with others is refused. The table's clock
record (``{namespace}:clock``) is written after the rows it describes, on the same
connection: a standalone server applies and persists (AOF, RDB) them in that order. Redis
Cluster keeps it on another node than most rows, with no order between nodes.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator
from itertools import chain
from urllib.parse import parse_qs, urlsplit, urlunsplit

import hiredis
import numpy as np
import redis
import redis.exceptions as rex
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dynembed._args import is_real
from dynembed.errors import (
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from dynembed.kernels import hash_index
from dynembed.storage.base import EmbeddingStore
from dynembed.storage.rows import decode_ids, encode_ids

logger = logging.getLogger(__name__)

_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads sequential ids over shards
_MULTI = hiredis.pack_command((b"MULTI",))
_EXEC = hiredis.pack_command((b"EXEC",))


_CREDENTIALS = (rex.AuthenticationError, rex.AuthorizationError)
"""Refused credentials; redis-py files them under ConnectionError, which is retried."""


class _Retry(Retry):
    """redis-py's Retry, giving up at once on refused credentials: retrying cannot fix a
    password, and the backoff only delayed the error."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            return not isinstance(error, _CREDENTIALS) and (
                is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


_DECODING_OPTIONS = ("decode_responses", "encoding", "encoding_errors")
"""URL options that make redis-py decode replies to str: the store's records are binary."""


def _check_url(url: str, cluster: bool) -> None:
    """Refuses URLs that redis-py would misread silently (its path parser drops a path that
    is not a bare number and uses database 0: ``/1/`` is 1, but ``/0/x`` and ``/a`` are 0, and
    ``/1/2`` is 12) or that would decode binary rows to str.

    Raises:
        ValueError: naming ``url`` (password redacted), what is wrong and the expected form.
    """
    shown = _redact(url)
    form = "expected redis://[user:password@]host:port/db (rediss:// for TLS, unix:///path)"
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError as exc:
        raise ValueError(f"url {shown!r} has a bad port ({exc}); {form}") from exc
    query = parse_qs(parts.query)
    decoding = [name for name in _DECODING_OPTIONS if name in query]
    if decoding:
        raise ValueError(f"url {shown!r} sets {', '.join(decoding)}: RedisStore reads its "
                         "binary rows as bytes; remove the option from the URL")
    db = 0
    if parts.scheme != "unix" and parts.path not in ("", "/"):
        number = parts.path[1:].rstrip("/")  # redis-py reads "/1/" as database 1 too
        if not number.isdigit():
            raise ValueError(f"url {shown!r} has the path {parts.path!r}, which is not a "
                             f"database number; {form}")
        db = int(number)
    if "db" in query:
        if not query["db"][0].isdigit():
            raise ValueError(f"url {shown!r} has db={query['db'][0]!r}, which is not a "
                             f"database number; {form}")
        db = int(query["db"][0])
    if cluster and db != 0:
        raise ValueError(f"url {shown!r} names database {db}, but a Redis Cluster has only "
                         "database 0: drop it from the URL (the namespace keeps tables apart)")


def _as_int(name: str, value, minimum: int) -> int:
    """``value`` as a Python int (numpy integers count, bools do not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


MAX_SHARDS = 1 << 16
"""Most hashes a table may be spread over (a key name each is kept, and a scan visits each)."""


class RedisStore(EmbeddingStore):
    """Rows in a Redis server or Redis Cluster.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS).
        namespace: prefix of this table's hashes; tables sharing a server need different
            ones, and every machine that shares one table uses the same.
        shards: hashes per table, a power of two (more spread the table over cluster nodes).
        cluster: connect to a Redis Cluster (``url`` names any node).
        retries: retries of a failed command on connection errors and timeouts.
        backoff_base, backoff_cap: seconds of the first retry wait and of the longest one.
        timeout: socket connect/read timeout in seconds.

    Raises:
        ValueError, TypeError: a bad argument (the message names it).
        StoreUnavailableError: the server cannot be reached.
    """

    shared = True  # one namespace may hold the rows of every shard of a table

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, namespace: str,
                 shards: int = 64, cluster: bool = False, retries: int = 3,
                 backoff_base: float = 0.05, backoff_cap: float = 1.0,
                 timeout: float = 5.0) -> None:
        super().__init__()
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be a redis:// (or rediss://, unix://) URL, got {url!r}")
        if not isinstance(namespace, str) or not namespace or "{" in namespace:
            raise ValueError(f"namespace must be a non-empty str without braces, got "
                             f"{namespace!r}")
        if (isinstance(shards, (bool, np.bool_)) or not isinstance(shards, numbers.Integral)
                or shards <= 0 or shards & (shards - 1) or shards > MAX_SHARDS):
            raise ValueError(f"shards must be a power of two in [1, {MAX_SHARDS}], got "
                             f"{shards!r}")
        shards = int(shards)  # numpy integers have no bit_length
        if not isinstance(cluster, bool):
            raise TypeError(f"cluster must be True or False, got {cluster!r}")
        retries = _as_int("retries", retries, 0)
        seconds = {}
        for arg, value in (("backoff_base", backoff_base), ("backoff_cap", backoff_cap),
                           ("timeout", timeout)):
            if not is_real(value) or not 0 < value < math.inf:
                raise ValueError(f"{arg} must be a finite number of seconds > 0, got "
                                 f"{value!r}")
            seconds[arg] = float(value)
        backoff_base, backoff_cap, timeout = (seconds["backoff_base"], seconds["backoff_cap"],
                                              seconds["timeout"])
        _check_url(url, cluster)
        self.url, self.namespace, self.shards, self.cluster = url, namespace, shards, cluster
        self.retries = retries
        self.name = f"RedisStore({_redact(url)!r}, namespace={namespace!r})"
        self._shard_bits = np.uint64(64 - shards.bit_length() + 1)
        self._keys = [f"{namespace}:{{{s:x}}}".encode() for s in range(shards)]
        self._meta_key = f"{namespace}:meta".encode()
        self._clock_key = f"{namespace}:clock".encode()
        backoff = ExponentialBackoff(cap=backoff_cap, base=backoff_base)
        self._retry = _Retry(backoff, retries, supported_errors=(
            rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError))
        kwargs = {"retry": _Retry(backoff, retries),
                  "retry_on_error": [rex.ConnectionError, rex.TimeoutError],
                  "socket_timeout": timeout, "socket_connect_timeout": timeout}
        self._client = None
        try:
            self._connect(url, kwargs)
        except BaseException:
            if self._client is not None:  # no socket outlives a store that was never made
                self._client.close()
            raise

    def _connect(self, url: str, kwargs: dict) -> None:
        try:
            if self.cluster:
                self._client = redis.cluster.RedisCluster.from_url(url, **kwargs)
            else:
                self._client = redis.Redis.from_url(url, **kwargs)
            self._client.ping()
            if not self.cluster:
                self._refuse_cluster_node()
        except (TypeError, ValueError) as exc:  # redis-py's own checks of URL options
            raise ValueError(f"url {_redact(url)!r} has an option redis-py refuses ({exc}); "
                             "fix or remove it") from exc
        except rex.RedisClusterException as exc:
            if "not enabled" in str(exc):  # "Cluster mode is not enabled on this node"
                raise StoreError(f"{self.name}: cannot connect: the server is not a Redis "
                                 f"Cluster node ({exc}); pass cluster=False") from exc
            raise self._translate("connect", exc) from exc
        except rex.RedisError as exc:
            raise self._translate("connect", exc) from exc

    # ------------------------------------------------------------------ helpers
    def _refuse_cluster_node(self) -> None:
        """A cluster node answers commands for its own slots only, so cluster=False over one
        worked for some ids and failed with MOVED for others, mid-training."""
        try:
            enabled = self._client.info("cluster").get("cluster_enabled")
        except rex.ResponseError:  # INFO renamed or not permitted: cannot tell, go on
            return
        if enabled in (1, "1"):
            raise StoreError(f"{self.name}: cannot connect: the server is a Redis Cluster "
                             "node; pass cluster=True")

    def _translate(self, action: str, exc: Exception) -> StoreError:
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, _CREDENTIALS):
            return StoreError(
                f"{self.name}: cannot {action}: the server refused the credentials ({text}); "
                "give the right user and password in the URL "
                "(redis://user:password@host:port/db)")
        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError,
                            rex.ClusterDownError)) or "connect" in text.lower():
            return StoreUnavailableError(
                f"{self.name}: cannot {action}: the server is unreachable after "
                f"{self.retries} retries ({text}); check that it runs and the URL is right")
        if "OOM" in text or "maxmemory" in text:
            # a standalone server runs a write batch in MULTI/EXEC, which refuses it whole;
            # a cluster pipeline has no transaction: the nodes with room took their part
            applied = ("part of this batch may have been written (Redis Cluster has no "
                       "transactions across nodes; a table keeps the rows in memory and "
                       "writes them again)" if self.cluster
                       else "nothing of this batch was applied")
            return StoreFullError(
                f"{self.name}: cannot {action}: the server is out of memory ({text}); "
                f"{applied}; raise its maxmemory or use another store")
        return StoreError(f"{self.name}: cannot {action}: {text}")

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        if self.shards == 1:
            return np.zeros(ids.shape[0], dtype=np.int64)
        return ((ids.view(np.uint64) * _MIX) >> self._shard_bits).astype(np.int64)

    def _by_shard(self, ids: np.ndarray):
        """(order, [(shard, start, stop)]) to visit ids grouped by shard."""
        shard = self._shard_of(ids)
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(self.shards + 1))
        groups = [(s, int(bounds[s]), int(bounds[s + 1])) for s in range(self.shards)
                  if bounds[s + 1] > bounds[s]]
        return order, groups

    def _lost(self, action: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"{self.name}: cannot {action}: the server no longer holds the description "
            "record this namespace had when the table opened it (it is gone, or was written "
            "again by another process), so its rows are gone too (a restart without "
            "persistence, a FLUSHALL, or eviction under a maxmemory policy); rows read now "
            "would be made anew from the initializer. Restore the table from a checkpoint "
            "(which empties the namespace and describes it again), and run Redis with "
            "persistence (appendonly) and maxmemory-policy noeviction")

    def _intact(self, meta: bytes | None) -> bool:
        """Whether ``meta`` (the record read now) is the one the table bound to: after a
        loss, another process (an evaluation table over the same namespace) may describe
        it again with the same layout, and a check for its presence passed while the
        trained rows read back as new ones."""
        return meta is not None and bytes(meta) == self._bound_meta

    def _send_rows(self, action: str, commands: list[tuple], *, write: bool) -> list:
        """:meth:`_send` of commands on rows, with a check in the same pipeline that the
        namespace's description record is still the one bound to: a server that lost its
        data answers every read as "absent" and takes every write, so nothing else would
        notice.

        Raises:
            StoreCorruptError: the record is gone or another (for a write, after the batch
                was sent).
        """
        if self.codec is None:  # not bound yet: there is no record to lose
            return self._send(action, commands, write=write)
        *replies, meta = self._send(action, [*commands, (b"GET", self._meta_key)],
                                    write=write)
        if not self._intact(meta):
            raise self._lost(action)
        return replies

    def clear(self) -> None:
        """Removes every row and the clock record. A namespace whose data the server lost
        (see :meth:`_lost`) is described again first: a restore from a checkpoint empties
        the store before writing the checkpoint's rows, and failed there with the same
        error that told the user to restore."""
        self._codec()
        if not self._intact(self._get_meta()):
            logger.warning("%s: the server lost this namespace's data; describing it again "
                           "before emptying it", self.name)
            self.codec = None
            self.bind(*self._bound)
        super().clear()

    def _send(self, action: str, commands: list[tuple], *, write: bool) -> list:
        """Runs commands as one pipeline (MULTI/EXEC for writes on a standalone server).

        Writes are one MULTI/EXEC (all or nothing); reads need no transaction, which also
        keeps them working when the server refuses writes (maxmemory).

        On a standalone server the commands are packed by hiredis in C and sent on a pooled
        connection: redis-py's pipeline re-checks every argument in Python (about a third
        of a batch's time for 4,096 rows). Redis Cluster keeps redis-py's pipeline, which
        routes each command to its node. Connection errors are retried with the client's
        backoff; a reply that was not read closes the connection, so none is misread later.
        """
        self._check_open()
        if self.cluster:  # no transactions across nodes

            def run() -> list:
                pipe = self._client.pipeline(transaction=False)
                for name, *args in commands:
                    pipe.execute_command(name.decode(), *args)
                return pipe.execute()

            try:  # the cluster pipeline retries without waiting: back off between tries
                return self._retry.call_with_retry(run, lambda _error: None)
            except (rex.RedisError, rex.RedisClusterException) as exc:
                raise self._translate(action, exc) from exc
        packed = [hiredis.pack_command(c) for c in commands]
        if write:
            packed = [_MULTI, *packed, _EXEC]
        payload = b"".join(packed)
        pool = self._client.connection_pool
        try:
            conn = pool.get_connection()
        except (rex.RedisError, rex.RedisClusterException) as exc:
            raise self._translate(action, exc) from exc

        def attempt() -> list:
            conn.send_packed_command([payload])
            if not write:
                return [conn.read_response() for _ in commands]
            for _ in range(len(commands) + 1):  # +OK of MULTI, +QUEUED of each command
                conn.read_response()
            return conn.read_response()  # EXEC: the list of replies, or an error

        try:
            replies = conn.retry.call_with_retry(attempt, lambda error: conn.disconnect())
        except (rex.RedisError, rex.RedisClusterException) as exc:
            conn.disconnect()  # unread replies may be left on it
            raise self._translate(action, exc) from exc
        except BaseException:
            # e.g. Ctrl-C between two reads: the rest of this batch's replies would be read
            # by the next batch as its own rows
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        for reply in replies:
            if isinstance(reply, Exception):
                raise self._translate(action, reply)
        return replies

    # ------------------------------------------------------------------ primitives
    def _get(self, ids: np.ndarray) -> list:
        order, groups = self._by_shard(ids)
        fields = encode_ids(ids[order])
        answers = self._send_rows("read", [(b"HMGET", self._keys[s], *fields[a:b])
                                           for s, a, b in groups], write=False)
        out = np.empty(ids.shape[0], dtype=object)
        out[order] = list(chain.from_iterable(answers))
        return out.tolist()

    def _put(self, ids: np.ndarray, values: list[bytes]) -> None:
        order, groups = self._by_shard(ids)
        fields = encode_ids(ids[order])
        ordered = np.array(values, dtype=object)[order].tolist() if len(groups) > 1 else values
        # HSET key f1 v1 f2 v2 ..., the pairs interleaved in C
        self._send_rows("write", [(b"HSET", self._keys[s],
                                   *chain.from_iterable(zip(fields[a:b], ordered[a:b])))
                                  for s, a, b in groups], write=True)

    def _delete(self, ids: np.ndarray) -> None:
        order, groups = self._by_shard(ids)
        fields = encode_ids(ids[order])
        self._send_rows("delete", [(b"HDEL", self._keys[s], *fields[a:b])
                                   for s, a, b in groups], write=True)

    def _scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
        # a namespace that lost its data scans as empty: refused, as every row command
        if self.codec is not None and not self._intact(self._get_meta()):
            raise self._lost("scan")
        for key in self._keys:
            cursor, seen = 0, _SeenIds()
            while True:
                # redis-py reconnects a closed client on demand: a scan left open would go
                # on reading (and leave a socket behind) after close()
                self._check_open()
                try:
                    cursor, found = self._client.hscan(key, cursor, count=batch_size)
                except (rex.RedisError, rex.RedisClusterException) as exc:
                    raise self._translate("scan", exc) from exc
                if found:
                    fields = list(found.keys())
                    if set(map(len, fields)) != {8}:  # not an id: not this store's
                        raise StoreCorruptError(
                            f"{self.name}: hash {key.decode()!r} holds a field that is not "
                            "a row id (8 bytes); another program wrote into this namespace: "
                            "remove the field or use another namespace")
                    ids = decode_ids(fields)
                    # HSCAN may repeat a field when the hash is resized during the scan
                    fresh = seen.add_new(ids)
                    values = list(found.values())
                    if not fresh.all():
                        values = np.array(values, dtype=object)[fresh].tolist()
                    yield ids[fresh], values
                if cursor == 0:
                    break
        # a server that lost its data during the scan answers the rest of it as empty
        # hashes: a scan cut short must fail, not pass for the whole store
        if self.codec is not None and not self._intact(self._get_meta()):
            raise self._lost("scan")

    def _count(self) -> int:
        return int(sum(self._send_rows("count", [(b"HLEN", key) for key in self._keys],
                                       write=False)))

    def _get_meta(self) -> bytes | None:
        return self._send("read", [(b"GET", self._meta_key)], write=False)[0]

    def _put_meta(self, value: bytes) -> None:
        # NX: of two machines binding a new namespace at once, the first one's record wins
        # and the other checks against it
        self._send("write", [(b"SET", self._meta_key, value, b"NX")], write=True)

    def _get_clock(self) -> bytes | None:
        return self._send("read", [(b"GET", self._clock_key)], write=False)[0]

    def _put_clock(self, value: bytes) -> None:
        # with the description record's check: a server that lost the rows must not be
        # told the table's clock as if it held them
        self._send_rows("write", [(b"SET", self._clock_key, value)], write=True)

    def _delete_clock(self) -> None:
        self._send("write", [(b"DEL", self._clock_key)], write=True)

    def _layout(self) -> dict:
        return {"shards": self.shards}  # which hash holds an id depends on it

    def _close(self) -> None:
        self._client.close()


class _SeenIds:
    """The ids a scan of one hash gave so far (HSCAN may repeat a field): a hash probe per
    id, so a scan held over many calls (a table's sweep) costs the same at its end as at
    its start (a sorted search over all of them grew with the scan)."""

    def __init__(self) -> None:
        self._buckets = hash_index.empty_buckets(0)
        self._size = 0

    def add_new(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of (n,) distinct ids were not seen before; adds them."""
        fresh = hash_index.index_find(self._buckets, ids, 1) == hash_index.EMPTY
        new = ids[fresh]
        if hash_index.buckets_for(self._size + new.shape[0]) > self._buckets.shape[0]:
            grown = hash_index.empty_buckets(self._size + new.shape[0])
            hash_index.index_rehash(self._buckets, grown)
            self._buckets = grown
        inserted = hash_index.index_insert(
            self._buckets, new, np.full(new.shape[0], hash_index.EMPTY, dtype=np.int64),
            np.empty(0, np.int64), 0, self._size, new.shape[0])[0]
        self._size += inserted
        return fresh
