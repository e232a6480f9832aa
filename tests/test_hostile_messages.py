"""Hostile messages never jam a worker slot: whatever bytes arrive, the message is kept and
answered, and the slot goes on serving.

The messages are hand-built AMQP frames (``tests/rawamqp.py``): non-UTF-8 short-string
properties, header tables thousands deep, non-UTF-8 header keys, task names near the frame
size, and a fuzzed mix of all of these. Such a message used to send the slot that got it into
a hot reconnect loop (fail, drop the connection, get the same message again, forever), and two
of them stopped a two-slot worker. Every test here checks, for every hostile message:

* it is dead-lettered into ``<queue>.dlq`` with its reason (``x-taskq-dead-reason``,
  ``x-taskq-dead-exception``, ...) and its body byte for byte;
* its caller, if it named a usable ``reply_to`` (a UTF-8 name of an existing queue), gets one
  FAILURE result with its correlation id;
* a normal task still succeeds right after it, the worker is alive and its log shows no
  reconnect storm;

and at the end it counts every queue involved: the work queue is empty (nothing ready, nothing
unacked), the DLQ holds exactly one letter per hostile message (matched by a marker in each
body), the reply queue exactly one result per message with a usable reply_to.

Every hostile message names a task the worker doesn't have (or has an undecodable body), so
none can legitimately run: each must end in the DLQ.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import amqp
import pytest
from amqp.serialization import dumps

from . import rawamqp
from .rawamqp import Pairs, Raw
from .support import RABBIT_HOST, RABBIT_PORT, Broker, WorkerProcess, unique, wait_for

HOST = f"{RABBIT_HOST}:{RABBIT_PORT}"
FAST = 10  # seconds: how long a slot may take to dead-letter one message, or to run add()
UNKNOWN_TASK = "tests.hostile.no_such_task"
NOT_UTF8 = b"\xff\xfe\xc3\x28"  # not a valid start byte, and a broken 2-byte sequence
#: An exception line of a traceback, e.g. "UnicodeDecodeError: 'utf-8' codec can't ...".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exceeded)\b.*$", re.MULTILINE)
DEAD_HEADERS = ("x-taskq-dead-reason", "x-taskq-dead-exception", "x-taskq-dead-at",
                "x-taskq-original-queue")

pytestmark = pytest.mark.rabbitmq


@dataclass
class Hostile:
    """One hostile message: what was sent and what must come of it."""

    marker: str  # unique, and in the body: finds its dead letter
    body: bytes
    properties: dict[str, Any]
    #: Its reply_to is usable: the caller must get exactly one FAILURE result.
    answered: bool
    #: The result must carry this correlation id (None: match the body's task_id instead).
    correlation_id: str | None
    describe: str


class Scene:
    """One test's worker, queues and publisher, and everything hostile it sent so far."""

    def __init__(self, broker: Broker, queue: str, worker: WorkerProcess,
                 tasks: SimpleNamespace, publisher: rawamqp.RawPublisher,
                 reply_queue: str) -> None:
        self.broker, self.queue, self.worker, self.tasks = broker, queue, worker, tasks
        self.publisher, self.reply_queue = publisher, reply_queue
        self.dlq = f"{queue}.dlq"
        self.sent: list[Hostile] = []
        self.normal_runs = 0
        self._counter = broker.connect()
        self._channel = self._counter.channel()

    def close(self) -> None:
        self._counter.close()

    def ready(self, queue: str) -> int:
        """Messages ready in a queue (a passive declare on one long-lived channel: fast);
        0 while it does not exist."""
        try:
            _, ready, _ = self._channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            self._channel = self._counter.channel()  # the broker closed the old one
            return 0
        return int(ready)

    # -- sending -------------------------------------------------------------------------

    def send(self, *batch: Hostile) -> None:
        """Publish a batch at once (one per slot), wait until every one of them is in the
        DLQ, then check that a normal task still runs."""
        for hostile in batch:
            self.publisher.publish(self.queue, hostile.body, hostile.properties)
        self.sent.extend(batch)
        what = "; ".join(h.describe for h in batch)
        try:
            wait_for(lambda: self.ready(self.dlq) >= len(self.sent), FAST,
                     f"{len(self.sent)} dead letter(s) in {self.dlq}, the last for: {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None
        self.still_serving(after=what)

    def still_serving(self, after: str) -> None:
        self.normal_runs += 1
        x = self.normal_runs
        try:
            value = self.tasks.add.delay(x, 1000).get(timeout=FAST)
        except Exception as exc:
            raise AssertionError(
                f"a normal task failed ({exc!r}) after the hostile message(s): {after}\n"
                f"{self.diagnosis()}") from None
        assert value == x + 1000
        assert self.worker.proc.poll() is None, f"the worker exited\n{self.diagnosis()}"

    # -- what the worker did ----------------------------------------------------------------

    def diagnosis(self) -> str:
        """What the worker log says: reconnects, tracebacks, and the first exception."""
        log = self.worker.log()
        first = EXCEPTION_LINE.search(log)
        lost = next((line.split("taskq.worker: ", 1)[-1] for line in log.splitlines()
                     if "lost the connection" in line), None)
        return (f"worker log ({self.worker.log_path}): {_reconnects(log)} reconnect lines, "
                f"{log.count('Traceback')} tracebacks; first exception: "
                f"{first.group(0)[:300] if first else None!r}; first connection loss: "
                f"{lost[:300] if lost else None!r}")

    def check_accounts(self) -> None:
        """Every queue holds what it should, and the worker was never in a reconnect storm."""
        assert self.worker.proc.poll() is None, f"the worker exited\n{self.diagnosis()}"
        info = self.broker.queue_info(self.queue)
        assert (info["messages_ready"], info["messages_unacknowledged"]) == ("0", "0"), (
            f"work queue not empty: {info}\n{self.diagnosis()}")
        assert int(info["consumers"]) == self.worker.concurrency, (
            f"not every slot consumes: {info}\n{self.diagnosis()}")
        self._check_dead_letters()
        self._check_replies()
        log = self.worker.log()
        assert _reconnects(log) <= 3, f"reconnect storm\n{self.diagnosis()}"
        assert log.count("Traceback") <= len(self.sent) + 3, f"traceback storm\n{self.diagnosis()}"

    def _check_dead_letters(self) -> None:
        letters = rawamqp.get_all(HOST, self.broker.vhost, self.dlq)
        by_marker: dict[str, list[rawamqp.RawMessage]] = {h.marker: [] for h in self.sent}
        strays: list[rawamqp.RawMessage] = []
        for letter in letters:
            marker = next((h.marker for h in self.sent if letter.body == h.body), None)
            (by_marker[marker] if marker else strays).append(letter)
        assert not strays, f"{len(strays)} dead letters match no hostile message sent (bodies " \
            f"changed?): {[bytes(s.body[:60]) for s in strays]}"
        for hostile in self.sent:
            found = by_marker[hostile.marker]
            assert len(found) == 1, f"{len(found)} dead letters for {hostile.describe}"
            _check_letter(found[0], hostile, self.queue)
        assert len(letters) == len(self.sent)

    def _check_replies(self) -> None:
        replies = rawamqp.get_all(HOST, self.broker.vhost, self.reply_queue)
        expected = [h for h in self.sent if h.answered]
        decoded = [(r.properties.get("correlation_id"), json.loads(r.body)) for r in replies]
        for hostile in expected:
            mine = [body for cid, body in decoded
                    if (cid == hostile.correlation_id if hostile.correlation_id
                        else body.get("task_id") == hostile.marker)]
            assert len(mine) == 1, f"{len(mine)} results for {hostile.describe}; the reply " \
                f"queue holds {len(replies)} for {len(expected)} callers\n{self.diagnosis()}"
            assert mine[0]["status"] == "FAILURE", mine[0]
            assert mine[0]["result"]["exc_type"], mine[0]
        assert len(replies) == len(expected), f"{len(replies)} results for {len(expected)} callers"


def _reconnects(log: str) -> int:
    return sum(1 for line in log.splitlines()
               if "lost the connection" in line or "reconnecting" in line)


def _check_letter(letter: rawamqp.RawMessage, hostile: Hostile, queue: str) -> None:
    headers = letter.properties.get("application_headers")
    assert isinstance(headers, dict), (
        f"dead letter without readable headers ({letter.properties}) for {hostile.describe}")
    for name in DEAD_HEADERS:
        value = headers.get(name)
        assert isinstance(value, str) and value, (
            f"dead letter header {name} = {value!r} for {hostile.describe}")
    assert headers["x-taskq-original-queue"] == queue
    sent_cid = hostile.properties.get("correlation_id")
    if isinstance(sent_cid, str) and sent_cid:  # a valid property can always be kept
        assert letter.properties.get("correlation_id") == sent_cid, hostile.describe


@pytest.fixture
def scene(broker: Broker, queue: str, start_worker: Callable[..., WorkerProcess],
          tasks: SimpleNamespace) -> Iterator[Scene]:
    worker = start_worker(concurrency=2)
    reply_queue = unique("hostile-reply")
    with broker.channel() as channel:
        channel.queue_declare(reply_queue, durable=True, auto_delete=False)
    publisher = rawamqp.RawPublisher(HOST, broker.vhost)
    test_scene = Scene(broker, queue, worker, tasks, publisher, reply_queue)
    try:
        yield test_scene
    finally:
        test_scene.close()
        publisher.close()
        broker.delete_queue(reply_queue)


def hostile(scene: Scene, what: str, *, headers: dict[Any, Any] | None = None,
            properties: dict[str, Any] | None = None, answered: bool = True) -> Hostile:
    """A task message for a task the worker doesn't have, with the given hostile parts.

    Otherwise well-formed: a JSON body, correlation id and ``id`` header = its marker,
    reply_to = the test's reply queue. ``properties`` replace properties, ``headers`` are
    added to the headers.
    """
    marker = f"hostile-{uuid.uuid4().hex}"
    props: dict[str, Any] = {
        "content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2,
        "correlation_id": marker, "reply_to": scene.reply_queue,
        "application_headers": {"lang": "py", "task": UNKNOWN_TASK, "id": marker,
                                **(headers or {})},
    }
    props.update(properties or {})
    cid = props.get("correlation_id")
    return Hostile(marker=marker, body=json.dumps([[marker], {}, {}]).encode(),
                   properties=props, answered=answered,
                   correlation_id=cid if isinstance(cid, str) else None,
                   describe=f"{what} ({marker})")


def send_three(scene: Scene, make: Callable[[], Hostile]) -> None:
    """One hostile message alone, then two at once (one for each slot), then the accounts."""
    scene.send(make())
    scene.send(make(), make())
    scene.check_accounts()


def nested(depth: int, kind: str = "table", leaf: Any = "bottom") -> Any:
    """A value ``depth`` containers deep: tables, arrays, or alternating ("mixed")."""
    value = leaf
    for level in range(depth):
        table = kind == "table" or (kind == "mixed" and level % 2 == 0)
        value = {"k": value} if table else [value]
    return value


# -- the cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["content_type", "content_encoding", "reply_to",
                                  "correlation_id"])
def test_a_property_that_is_not_utf8(scene: Scene, name: str) -> None:
    """Given a two-slot worker, when messages arrive whose ``name`` property is bytes that are
    not UTF-8 (the frame reader used to raise UnicodeDecodeError), then each is dead-lettered,
    its caller answered if its reply_to is usable, and the worker keeps serving."""
    def make() -> Hostile:
        value = NOT_UTF8 + uuid.uuid4().hex.encode()
        return hostile(scene, f"{name} = {value!r}", properties={name: value},
                       answered=name != "reply_to")

    send_three(scene, make)


@pytest.mark.parametrize(("depth", "kind"), [(1000, "table"), (5000, "table"), (5000, "array")])
def test_headers_nested_thousands_deep(scene: Scene, depth: int, kind: str) -> None:
    """Given a two-slot worker, when messages arrive with a header nested ``depth`` levels
    deep (RecursionError in the reader, and in anything else that recurses: 400 was fine),
    then each is dead-lettered and answered, and the worker keeps serving."""
    def make() -> Hostile:
        return hostile(scene, f"a header {depth} {kind}s deep",
                       headers={"nested": nested(depth, kind)})

    send_three(scene, make)


@pytest.mark.parametrize("where", ["top level", "one level down"])
def test_a_header_key_that_is_not_utf8(scene: Scene, where: str) -> None:
    """Given a two-slot worker, when messages that must be dead-lettered (unknown task) carry
    a header key that is not UTF-8 (cleaning the headers for the dead letter used to raise
    TypeError/AttributeError), then each is dead-lettered and answered all the same."""
    def make() -> Hostile:
        key = NOT_UTF8 + b"-key"
        extra = {key: "value"} if where == "top level" else {"inner": {key: "value"}}
        return hostile(scene, f"a non-UTF-8 header key at the {where}", headers=extra)

    send_three(scene, make)


def test_a_task_name_of_70_kb(scene: Scene) -> None:
    """Given a two-slot worker, when messages arrive whose task name is 70 KB (the dead
    letter, carrying the name in its header and again in its reason, outgrew frame_max and
    the broker closed the slot's connection with FRAME_ERROR), then each is dead-lettered
    and answered, and the worker keeps serving."""
    def make() -> Hostile:
        name = "tests.hostile." + "x" * 70_000
        letter = hostile(scene, "a 70 KB task name")
        letter.properties["application_headers"]["task"] = name
        return letter

    send_three(scene, make)


@pytest.mark.parametrize("seconds", [2**64 - 1, 2**62, 2**50],
                         ids=["OverflowError", "OSError", "ValueError"])
def test_a_timestamp_header_no_datetime_can_hold(scene: Scene, seconds: int) -> None:
    """Given a two-slot worker, when messages arrive with a timestamp header (``T``) far
    beyond year 9999 (py-amqp's reader raises OverflowError, OSError(EOVERFLOW) or ValueError
    depending on the value; an OSError looks like a lost connection), then each is
    dead-lettered and answered, and the worker keeps serving."""
    def make() -> Hostile:
        return hostile(scene, f"a timestamp header of {seconds} seconds",
                       headers={"when": Raw(b"T", struct.pack(">Q", seconds))})

    send_three(scene, make)


def test_a_well_formed_raw_message_runs(scene: Scene) -> None:
    """The harness itself: a well-formed message built by tests/rawamqp.py runs, and one
    naming an unknown task is dead-lettered and answered (as on a correct client's send)."""
    task_id = str(uuid.uuid4())
    properties = {"content_type": "application/json", "content_encoding": "utf-8",
                  "delivery_mode": 2, "correlation_id": task_id, "reply_to": scene.reply_queue,
                  "application_headers": {"lang": "py", "task": "tests.apps.basic.add",
                                          "id": task_id}}
    scene.publisher.publish(scene.queue, b"[[2, 3], {}, {}]", properties)
    wait_for(lambda: scene.ready(scene.reply_queue), FAST, "the result of add(2, 3)")
    (result,) = rawamqp.get_all(HOST, scene.broker.vhost, scene.reply_queue)
    assert result.properties["correlation_id"] == task_id
    assert json.loads(result.body)["result"] == 5
    send_three(scene, lambda: hostile(scene, "an unknown task"))


# -- the fuzz ----------------------------------------------------------------------------------

DEFAULT_SEED = 20240611
FUZZ_COUNT = 40
#: Header names with a meaning (to Celery's protocol, taskq or RabbitMQ): the fuzzer gives them
#: hostile values only beside an unknown task name, and never makes them up by chance.
PROTOCOL_KEYS = ("id", "eta", "expires", "timelimit", "retries", "ignore_result", "root_id",
                 "parent_id", "group", "argsrepr", "kwargsrepr", "origin",
                 "x-taskq-delivery-count", "x-death", "x-taskq-dead-reason")
#: RabbitMQ routes by these (and refuses them unless they are arrays of strings).
ROUTING_KEYS = ("CC", "BCC")
SHORTSTR_PROPERTIES = ("content_type", "content_encoding", "correlation_id", "reply_to",
                       "message_id", "type", "app_id", "cluster_id")


class Fuzzer:
    """Random hostile messages, each one certain to be dead-lettered: its body starts with
    its marker (never JSON, so never decodable) and its task name is one the worker doesn't
    know, except for a plain valid name next to which no header has a meaning."""

    def __init__(self, seed: int, reply_queue: str, frame_max: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.reply_queue = reply_queue
        self.frame_max = frame_max

    # -- bytes and text --------------------------------------------------------------------

    def not_utf8(self, size: int) -> bytes:
        data = bytearray(self.rng.randbytes(max(1, size)))
        data[self.rng.randrange(len(data))] = self.rng.choice(b"\x80\xbf\xc0\xf5\xfe\xff")
        return bytes(data)

    def text(self, size: int) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyz.-_:/ 0123456789ÄÖéß€漢字🙂\u200b\x00"
        return "".join(self.rng.choice(alphabet) for _ in range(size))

    def shortstr(self, hostile: bool) -> str | bytes:
        """A short-string property value: any bytes if ``hostile``, else valid UTF-8."""
        rng = self.rng
        if hostile:
            if rng.random() < 0.2:
                return b"\xed\xa0\x80" + rng.randbytes(rng.randint(0, 20))  # a surrogate
            return self.not_utf8(rng.choice([1, 2, rng.randint(3, 254), 255]))
        makers: list[Callable[[], str]] = [
            lambda: "",
            lambda: self.text(rng.randint(1, 40)),
            lambda: "z" * 255,
            lambda: rng.choice(["application/json", "application/x-python-serialize",
                                "utf-8", "binary", "amq.rabbitmq.reply-to.bogus"]),
        ]
        return rng.choice(makers)()

    def key(self) -> str | bytes:
        rng = self.rng
        while True:
            choice = rng.randrange(6)
            if choice == 0:
                key: str | bytes = self.not_utf8(rng.choice([1, rng.randint(2, 255)]))
            elif choice == 1:
                key = "k" * rng.choice([0, 255])
            elif choice == 2:
                key = b"\xed\xa0\x80"
            else:
                key = self.text(rng.randint(1, 12))
            if key not in PROTOCOL_KEYS + ROUTING_KEYS + ("task",):
                return key

    # -- values ------------------------------------------------------------------------------

    def finite_bits(self, fmt: str, size: int) -> bytes:
        while True:
            raw = self.rng.randbytes(size)
            if math.isfinite(struct.unpack(fmt, raw)[0]):  # RabbitMQ refuses NaN and inf
                return raw

    def scalar(self) -> Any:
        rng = self.rng
        makers: list[Callable[[], Any]] = [
            lambda: self.text(rng.randint(0, 50)),
            lambda: self.not_utf8(rng.randint(1, 300)),
            lambda: rng.randint(-(2**31), 2**31 - 1),
            lambda: rng.randint(2**31, 2**63 - 1) * rng.choice([1, -1]),
            lambda: struct.unpack(">d", self.finite_bits(">d", 8))[0],
            lambda: Raw(b"f", self.finite_bits(">f", 4)),
            lambda: Raw(b"T", rng.randbytes(8)),  # most of these are beyond year 9999
            lambda: Raw(b"D", rng.randbytes(5)),
            lambda: Raw(b"b", rng.randbytes(1)),
            lambda: Raw(b"B", rng.randbytes(1)),
            lambda: Raw(b"s", rng.randbytes(2)),
            lambda: Raw(b"u", rng.randbytes(2)),
            lambda: Raw(b"i", rng.randbytes(4)),
            lambda: Raw(b"L", rng.randbytes(8)),
            lambda: Raw(b"t", bytes([rng.randint(2, 255)])),  # a boolean that is neither
            lambda: rng.choice([True, False, None]),
            lambda: Raw(b"x", rawamqp.longstr(rng.randbytes(rng.randint(0, 200)))),
            lambda: {},
            lambda: [],
        ]
        return rng.choice(makers)()

    def deep(self) -> tuple[Any, str]:
        depth = self.rng.choice([self.rng.randint(0, 10), self.rng.randint(300, 1500),
                                 self.rng.randint(1500, 6000)])
        kind = self.rng.choice(["table", "array", "mixed"])
        return nested(depth, kind, self.scalar()), f"nested {depth} ({kind})"

    def wide(self) -> tuple[Any, str]:
        count = self.rng.randint(100, 2000)
        if self.rng.random() < 0.5:
            return [self.scalar() for _ in range(count)], f"array of {count}"
        return Pairs((self.key(), self.scalar()) for _ in range(count)), f"table of {count}"

    def huge(self) -> tuple[Any, str]:
        size = self.rng.randint(90_000, 110_000)
        if self.rng.random() < 0.5:
            text = self.text(size // 2)
            return text, f"a {len(text.encode())}B string"
        return Raw(b"x", rawamqp.longstr(self.rng.randbytes(size))), f"a {size}B byte array"

    def task_name(self, protocol_headers: bool) -> tuple[Any, str]:
        """(value or None for no task header, description)."""
        rng = self.rng
        options: list[tuple[Callable[[], Any], str]] = [
            (lambda: None, "no task header"),
            (lambda: f"fuzz.unknown.{rng.getrandbits(32):x}", "an unknown name"),
            (lambda: "fuzz." + "n" * rng.randint(10_000, 60_000), "a huge name"),
            (lambda: self.not_utf8(rng.randint(1, 200)), "a non-UTF-8 name"),
            (lambda: rng.choice([42, Raw(b"T", rng.randbytes(8)), ["tests.apps.basic.add"],
                                 {"name": "tests.apps.basic.add"}, nested(3000)]),
             "a name that is not a string"),
        ]
        if not protocol_headers:  # a lenient worker might take these two for a valid name
            options.append((lambda: "tests.apps.basic.add", "a valid name (undecodable body)"))
            options.append((lambda: Raw(b"x", rawamqp.longstr(b"tests.apps.basic.add")),
                            "a valid name as a byte array (undecodable body)"))
        make, what = rng.choice(options)
        return make(), what

    # -- messages ----------------------------------------------------------------------------

    def properties(self, marker: str) -> tuple[dict[str, Any], bool, list[str]]:
        """Random basic properties; whether its reply_to is usable; what is odd about them."""
        rng = self.rng
        props: dict[str, Any] = {
            "delivery_mode": rng.choice([None, 1, 2]),
            "priority": rng.choice([None, 0, 9, 255]),
            "timestamp": rng.choice([None, rng.getrandbits(64)]),
            "expiration": rng.choice([None, "3600000"]),  # never expires during the test
            "user_id": rng.choice([None, "guest"]),  # the broker checks it
        }
        answered = rng.random() < 0.35
        names = [n for n in SHORTSTR_PROPERTIES
                 if not (answered and n in ("reply_to", "correlation_id"))]
        odd = []
        hostile = rng.random() < 0.4  # else every property is valid UTF-8
        for name in rng.sample(names, rng.randint(0, 5)):
            props[name] = self.shortstr(hostile)
            odd.append(f"{name}={_short(props[name])}")
        if answered:
            props["reply_to"], props["correlation_id"] = self.reply_queue, marker
            odd.append("usable reply_to")
        return props, answered, odd

    def headers(self, protocol: bool) -> tuple[list[tuple[Any, Any]], list[str]]:
        rng = self.rng
        entries: list[tuple[Any, Any]] = []
        odd: list[str] = []
        for _ in range(rng.randint(0, 6)):
            entries.append((self.key(), self.scalar()))
        if entries:
            kinds = sorted({v.kind.decode() for _, v in entries if isinstance(v, Raw)})
            bad_keys = sum(1 for k, _ in entries if isinstance(k, bytes))
            odd.append(f"{len(entries)} odd headers ({bad_keys} non-UTF-8 keys, "
                       f"types {''.join(kinds) or '-'})")
        for make, chance in ((self.deep, 0.4), (self.wide, 0.15), (self.huge, 0.2)):
            if rng.random() < chance:
                value, what = make()
                entries.append((self.key(), value))
                odd.append(what)
        if protocol:
            for key in rng.sample(PROTOCOL_KEYS, rng.randint(1, 4)):
                entries.append((key, rng.choice([self.scalar(), self.deep()[0]])))
            odd.append("hostile protocol headers")
        if entries and rng.random() < 0.15:
            entries.append(rng.choice(entries))  # a repeated key
            odd.append("a repeated key")
        rng.shuffle(entries)
        return entries, odd

    def message(self, index: int) -> Hostile:
        rng = self.rng
        marker = f"HOSTILE-{self.seed}-{index}-{rng.getrandbits(32):08x}"
        props, answered, odd = self.properties(marker)
        protocol = rng.random() < 0.3 and not answered  # ignore_result would silence it
        name, name_odd = self.task_name(protocol)
        entries, header_odd = self.headers(protocol)
        if name is not None:
            entries.insert(rng.randint(0, len(entries)), ("task", name))
        props["application_headers"] = Pairs(entries)
        if dropped := self.fit(props):
            header_odd.append(f"{dropped} header(s) dropped to fit frame_max")
        size = rng.choice([0, rng.randint(1, 100), rng.randint(1000, 20_000),
                           rng.randint(200_000, 400_000)])
        body = marker.encode() + b"\x00" + rng.randbytes(size)
        cid = props.get("correlation_id")
        describe = (f"#{index} {marker}: task {name_odd}; {', '.join(odd + header_odd)}; "
                    f"{len(body)}B body")
        return Hostile(marker=marker, body=body, properties=props, answered=answered,
                       correlation_id=cid if isinstance(cid, str) else None, describe=describe)

    def fit(self, props: dict[str, Any]) -> int:
        """Drop the largest headers (never the task name) until the content header frame fits
        frame_max: the broker refuses a larger one itself (a worker never sees it). Returns
        how many it dropped."""
        entries = props["application_headers"]
        dropped = 0
        while rawamqp.header_frame_size(rawamqp.encode_properties(props)) > self.frame_max:
            sizes = [(len(rawamqp.encode_value(v)), i) for i, (k, v) in enumerate(entries)
                     if k != "task"]
            del entries[max(sizes)[1]]
            dropped += 1
        return dropped


def _short(value: str | bytes) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(value)}B)"


def test_fuzzed_hostile_messages(scene: Scene) -> None:
    """Given a two-slot worker, when it gets FUZZ_COUNT random hostile messages (seed: env
    TASKQ_FUZZ_SEED, printed; count: TASKQ_FUZZ_COUNT), each followed by a normal task, then
    every one is dead-lettered byte for byte, every usable reply_to answered, the normal
    tasks all succeed, and the work queue ends empty."""
    seed = int(os.environ.get("TASKQ_FUZZ_SEED", DEFAULT_SEED))
    count = int(os.environ.get("TASKQ_FUZZ_COUNT", FUZZ_COUNT))
    print(f"fuzzing with TASKQ_FUZZ_SEED={seed} TASKQ_FUZZ_COUNT={count}")
    fuzzer = Fuzzer(seed, scene.reply_queue, scene.publisher.frame_max)
    started = time.monotonic()
    try:
        for index in range(count):
            scene.send(fuzzer.message(index))
        scene.check_accounts()
    except AssertionError as exc:
        raise AssertionError(f"[fuzz: rerun with TASKQ_FUZZ_SEED={seed} "
                             f"TASKQ_FUZZ_COUNT={count}] {exc}") from exc
    print(f"{count} hostile messages in {time.monotonic() - started:.1f}s")


# -- the harness's own encoder (no broker) ----------------------------------------------------


def test_the_raw_encoder_writes_what_py_amqp_writes_and_reads_back_anything() -> None:
    table = {"s": "text", "n": -5, "t": True, "v": None, "f": 2.5, "a": [1, "x", {"in": []}],
             "F": {"g": {"h": "i"}}}
    assert rawamqp.encode_table(table) == dumps("F", [table])

    deep = {b"\xff": nested(6000, "mixed", Raw(b"T", b"\xff" * 8)), "k" * 255: b"\xc3\x28"}
    encoded = rawamqp.encode_table(deep)
    decoded, end = rawamqp.decode_container(encoded, 0)
    assert end == len(encoded)
    assert rawamqp.encode_table(decoded) == encoded  # bytes compared: no deep recursion

    props = {"content_type": NOT_UTF8, "reply_to": "r", "priority": 3, "timestamp": 2**64 - 1,
             "application_headers": {"x": Raw(b"D", b"\x02\x00\x00\x01\x00")}}
    decoded_props, end = rawamqp.decode_properties(rawamqp.encode_properties(props))
    assert decoded_props == props
