"""Repository: every method on a migrated database (SQLite and PostgreSQL), its typed
errors, the duplicate rule (DESIGN §3.1), one transaction per batch, and concurrent
writers in separate processes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from router.db.engine import make_engine
from router.db.models import InstanceState
from router.db.repository import (
    AlreadyExists,
    Destination,
    InstanceResult,
    InUse,
    InvalidValue,
    NewInstance,
    NotFound,
    Repository,
    TlsOptions,
)
from router.rules import RuleSpec, parse_condition

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def url(db_url: str) -> str:
    """A migrated database of its own: SQLite and PostgreSQL (tests/conftest.py)."""
    return db_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(engine: Engine, clock: Clock) -> Repository:
    return Repository(engine, clock=clock)


def rule(
    name: str,
    *destinations: str,
    when: tuple[str, ...] = (),
    priority: int = 100,
    enabled: bool = True,
    stop: bool = False,
) -> RuleSpec:
    conditions = tuple(parse_condition(t) for t in when)
    return RuleSpec(name, priority, enabled, stop, conditions, destinations)


def instance(
    n: int, *destinations: str, digest: str = "d" * 64, uid: str | None = None, **kw: object
) -> NewInstance:
    fields: dict[str, object] = {
        "sop_instance_uid": uid or f"1.2.3.{n}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "study_instance_uid": "1.2.3",
        "calling_aet": "CT1",
        "called_aet": "ROUTER",
        "peer_address": "10.0.0.5",
        "spool_name": f"spool-{n:06d}",
        "size": 1000 + n,
        "digest": digest,
        "destinations": destinations,
        "unrouted": not destinations,
    }
    fields.update(kw)
    return NewInstance(**fields)  # type: ignore[arg-type]


def job_states(engine: Engine, instance_id: int) -> list[str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT state FROM jobs WHERE instance_id = :i ORDER BY id"), {"i": instance_id}
        )
        return [row[0] for row in rows]


def set_job_states(engine: Engine, instance_id: int, state: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE jobs SET state = :s WHERE instance_id = :i"),
            {"s": state, "i": instance_id},
        )


def count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


# -- destinations ---------------------------------------------------------------------------
def test_add_get_list_destinations(repo: Repository) -> None:
    pacs = repo.add_destination("pacs", "PACS", "pacs.example", 104)
    assert pacs == Destination(pacs.id, "pacs", "PACS", "pacs.example", 104, 2, 10, None, NOW)
    tls = TlsOptions(ca="/etc/ca.pem", cert="/etc/c.pem", key="/etc/k.pem")
    ai = repo.add_destination(
        "ai", "AI", "10.0.0.9", 11112, max_associations=4, max_retries=3, tls=tls
    )
    assert ai.tls == tls and ai.max_associations == 4 and ai.max_retries == 3
    assert repo.get_destination("pacs") == pacs
    assert repo.get_destination("ai") == ai
    assert [d.name for d in repo.list_destinations()] == ["ai", "pacs"]
    assert repo.get_destination("pacs").created_at.tzinfo is not None


def test_destination_errors(repo: Repository) -> None:
    repo.add_destination("pacs", "PACS", "h", 104)
    with pytest.raises(AlreadyExists, match="pacs"):
        repo.add_destination("pacs", "OTHER", "h2", 105)
    with pytest.raises(NotFound, match="nope"):
        repo.get_destination("nope")
    with pytest.raises(NotFound, match="nope"):
        repo.remove_destination("nope")
    with pytest.raises(InvalidValue):
        repo.add_destination("bad", "X", "h", 0)
    with pytest.raises(InvalidValue):
        repo.add_destination("bad", "X", "h", 104, max_associations=0)
    with pytest.raises(InvalidValue):
        repo.add_destination("", "X", "h", 104)


def test_remove_destination_refused_while_a_rule_uses_it(repo: Repository) -> None:
    repo.add_destination("pacs", "PACS", "h", 104)
    repo.add_destination("ai", "AI", "h", 105)
    repo.add_rule(rule("ct", "pacs", "ai"))
    with pytest.raises(InUse, match="ct"):
        repo.remove_destination("pacs")
    repo.remove_rule("ct")
    repo.remove_destination("pacs")
    assert [d.name for d in repo.list_destinations()] == ["ai"]


def test_remove_destination_refused_while_it_has_jobs_to_do(
    repo: Repository, engine: Engine
) -> None:
    repo.add_destination("pacs", "PACS", "h", 104)
    [result] = repo.record_instances([instance(1, "pacs")])
    for state in ("pending", "leased", "retry_wait", "dead"):
        set_job_states(engine, result.instance_id, state)
        with pytest.raises(InUse, match="job"):
            repo.remove_destination("pacs")
    set_job_states(engine, result.instance_id, "done")
    repo.remove_destination("pacs")  # its finished jobs go with it
    assert count(engine, "jobs") == 0
    assert repo.get_instance(result.instance_id).spool_name == "spool-000001"


# -- rules ----------------------------------------------------------------------------------
def test_add_get_list_rules(repo: Repository) -> None:
    repo.add_destination("pacs", "PACS", "h", 104)
    repo.add_destination("ai", "AI", "h", 105)
    ct = rule(
        "ct",
        "ai",
        "pacs",
        when=("Modality == CT", "not calling_aet in X,Y"),
        priority=10,
        stop=True,
    )
    stored = repo.add_rule(ct)
    assert stored == ct
    repo.add_rule(rule("all", "pacs", priority=50))
    repo.add_rule(rule("also", "pacs", priority=50, enabled=False))
    assert repo.get_rule("ct") == ct
    assert repo.get_rule("ct").destinations == ("ai", "pacs")  # the rule's order
    assert [c.text for c in repo.get_rule("ct").conditions] == [c.text for c in ct.conditions]
    assert [r.name for r in repo.list_rules()] == ["ct", "all", "also"]
    assert repo.get_rule("also").enabled is False


def test_rule_errors(repo: Repository, engine: Engine) -> None:
    repo.add_destination("pacs", "PACS", "h", 104)
    repo.add_rule(rule("ct", "pacs"))
    with pytest.raises(AlreadyExists, match="ct"):
        repo.add_rule(rule("ct", "pacs"))
    with pytest.raises(NotFound, match="ghost"):
        repo.add_rule(rule("mr", "pacs", "ghost"))
    assert [r.name for r in repo.list_rules()] == ["ct"]  # nothing written
    assert count(engine, "rule_destinations") == 1
    for call in (repo.get_rule, repo.remove_rule):
        with pytest.raises(NotFound, match="nope"):
            call("nope")
    with pytest.raises(NotFound, match="nope"):
        repo.set_rule_enabled("nope", True)


def test_set_rule_enabled_and_remove(repo: Repository, engine: Engine) -> None:
    repo.add_destination("pacs", "PACS", "h", 104)
    repo.add_rule(rule("ct", "pacs"))
    repo.set_rule_enabled("ct", False)
    assert repo.get_rule("ct").enabled is False
    repo.set_rule_enabled("ct", True)
    assert repo.get_rule("ct").enabled is True
    repo.remove_rule("ct")
    assert repo.list_rules() == []
    assert count(engine, "rule_destinations") == 0


def test_rules_version_bumps_with_every_change(repo: Repository) -> None:
    versions = [repo.rules_version()]

    def changed() -> None:
        versions.append(repo.rules_version())
        assert versions[-1] == versions[-2] + 1

    assert versions == [0]
    repo.add_destination("pacs", "PACS", "h", 104)
    changed()
    repo.add_rule(rule("ct", "pacs"))
    changed()
    repo.set_rule_enabled("ct", False)
    changed()
    repo.remove_rule("ct")
    changed()
    repo.remove_destination("pacs")
    changed()
    repo.add_source("CT1")
    changed()
    repo.remove_source("CT1")
    changed()
    # Reads and refused changes leave it alone.
    repo.list_rules()
    with pytest.raises(NotFound):
        repo.add_rule(rule("mr", "ghost"))
    assert repo.rules_version() == versions[-1]


# -- sources --------------------------------------------------------------------------------
def test_sources(repo: Repository) -> None:
    ct = repo.add_source("CT1", ["10.0.0.5", "192.168.1.0/24", "fd00::/8"])
    assert ct.addresses == ("10.0.0.5", "192.168.1.0/24", "fd00::/8")
    repo.add_source("MR1")
    assert [(s.ae_title, s.addresses) for s in repo.list_sources()] == [
        ("CT1", ("10.0.0.5", "192.168.1.0/24", "fd00::/8")),
        ("MR1", ()),
    ]
    with pytest.raises(AlreadyExists, match="CT1"):
        repo.add_source("CT1")
    with pytest.raises(InvalidValue, match="not-an-ip"):
        repo.add_source("US1", ["not-an-ip"])
    repo.remove_source("CT1")
    with pytest.raises(NotFound, match="CT1"):
        repo.remove_source("CT1")
    assert [s.ae_title for s in repo.list_sources()] == ["MR1"]


def test_source_operations(repo: Repository) -> None:
    """Catalogue SEC-05: what a source may do; both by default, in canonical order."""
    assert repo.add_source("CT1").operations == ("echo", "store")
    assert repo.add_source("ECHO1", operations=["echo"]).operations == ("echo",)
    assert repo.add_source("ST1", ["10.0.0.5"], ["store", "echo"]).operations == ("echo", "store")
    before = repo.rules_version()
    assert repo.set_source_operations("CT1", ["store"]).operations == ("store",)
    assert repo.rules_version() > before  # listeners reload sources on the next association
    assert {s.ae_title: s.operations for s in repo.list_sources()} == {
        "CT1": ("store",),
        "ECHO1": ("echo",),
        "ST1": ("echo", "store"),
    }
    with pytest.raises(InvalidValue, match="'find'"):
        repo.add_source("US1", operations=["echo", "find"])
    with pytest.raises(InvalidValue, match="at least one"):
        repo.add_source("US1", operations=[])
    with pytest.raises(InvalidValue, match="at least one"):
        repo.set_source_operations("CT1", [])
    with pytest.raises(NotFound, match="GHOST"):
        repo.set_source_operations("GHOST", ["echo"])
    assert [s.ae_title for s in repo.list_sources()] == ["CT1", "ECHO1", "ST1"]
    assert repo.list_sources()[0].operations == ("store",)


# -- ingest ---------------------------------------------------------------------------------
@pytest.fixture
def two(repo: Repository) -> Repository:
    repo.add_destination("pacs", "PACS", "h", 104)
    repo.add_destination("ai", "AI", "h", 105)
    return repo


def test_record_instances(two: Repository, engine: Engine) -> None:
    results = two.record_instances(
        [instance(1, "pacs", "ai", priority=2), instance(2, "ai"), instance(3)]
    )
    first, second, unrouted = results
    assert first.new_jobs and first.duplicate_of is None and len(first.job_ids) == 2
    assert second.new_jobs and len(second.job_ids) == 1
    assert unrouted == InstanceResult(unrouted.instance_id, (), None, False)
    got = two.get_instance(first.instance_id)
    assert got.sop_instance_uid == "1.2.3.1" and got.spool_name == "spool-000001"
    assert got.state is InstanceState.ROUTED and got.received_at == NOW
    assert two.get_instance(unrouted.instance_id).state is InstanceState.UNROUTED
    assert job_states(engine, first.instance_id) == ["pending", "pending"]
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT priority, attempts, deliveries FROM jobs WHERE instance_id = :i"),
            {"i": first.instance_id},
        ).all()
    assert rows == [(2, 0, 0), (2, 0, 0)]
    assert [i.id for i in two.list_instances()] == [
        unrouted.instance_id,
        second.instance_id,
        first.instance_id,
    ]
    assert len(two.list_instances(limit=1)) == 1
    assert two.spool_names() == {"spool-000001", "spool-000002", "spool-000003"}
    assert two.record_instances([]) == []


def test_a_destination_listed_twice_gets_one_job(two: Repository) -> None:
    [result] = two.record_instances([instance(1, "pacs", "pacs")])
    assert len(result.job_ids) == 1


def test_same_digest_with_pending_jobs_makes_no_new_jobs(two: Repository, engine: Engine) -> None:
    [first] = two.record_instances([instance(1, "pacs", "ai")])
    for state in ("pending", "leased", "retry_wait"):
        set_job_states(engine, first.instance_id, state)
        [again] = two.record_instances([instance(2, "ai", "pacs", uid="1.2.3.1")])
        assert again == InstanceResult(first.instance_id, first.job_ids, first.instance_id, False)
    assert count(engine, "instances") == 1
    assert count(engine, "jobs") == 2


def test_same_digest_other_destinations_makes_new_jobs(two: Repository, engine: Engine) -> None:
    [first] = two.record_instances([instance(1, "pacs", "ai")])
    [again] = two.record_instances([instance(2, "pacs", uid="1.2.3.1")])
    assert again.duplicate_of is None and again.new_jobs
    assert again.instance_id != first.instance_id
    assert count(engine, "jobs") == 3


def test_different_digest_makes_new_jobs(two: Repository) -> None:
    [first] = two.record_instances([instance(1, "pacs")])
    [again] = two.record_instances([instance(2, "pacs", uid="1.2.3.1", digest="e" * 64)])
    assert again.duplicate_of is None and again.new_jobs
    assert set(again.job_ids).isdisjoint(first.job_ids)


def test_jobs_done_makes_new_jobs(two: Repository, engine: Engine) -> None:
    [first] = two.record_instances([instance(1, "pacs")])
    for n, state in enumerate(("done", "dead"), start=10):
        set_job_states(engine, first.instance_id, state)
        [again] = two.record_instances([instance(n, "pacs", uid="1.2.3.1")])
        assert again.duplicate_of is None and again.new_jobs
        set_job_states(engine, again.instance_id, state)


def test_duplicate_within_one_batch(two: Repository) -> None:
    first, second = two.record_instances([instance(1, "pacs"), instance(2, "pacs", uid="1.2.3.1")])
    assert second.duplicate_of == first.instance_id and not second.new_jobs


def test_unrouted_duplicate(two: Repository, engine: Engine) -> None:
    [first] = two.record_instances([instance(1)])
    [again] = two.record_instances([instance(2, uid="1.2.3.1")])
    assert again == InstanceResult(first.instance_id, (), first.instance_id, False)
    # An unrouted resend of an instance that was routed is kept: its earlier copy may be
    # gone once its jobs are done.
    [routed] = two.record_instances([instance(3, "pacs")])
    set_job_states(engine, routed.instance_id, "done")
    [resend] = two.record_instances([instance(4, uid="1.2.3.3")])
    assert resend.duplicate_of is None


def test_a_failing_instance_writes_nothing_of_its_batch(two: Repository, engine: Engine) -> None:
    version = two.rules_version()
    with pytest.raises(NotFound, match="ghost"):
        two.record_instances([instance(1, "pacs"), instance(2, "ghost")])
    # The same spool name twice: the second insert fails after the first was flushed.
    with pytest.raises(AlreadyExists, match="spool-000001"):
        two.record_instances([instance(1, "pacs"), instance(2, "ai", spool_name="spool-000001")])
    with pytest.raises(InvalidValue):
        two.record_instances([instance(1, "pacs"), instance(2, unrouted=False)])
    assert count(engine, "instances") == 0
    assert count(engine, "jobs") == 0
    assert two.rules_version() == version


# -- queue ----------------------------------------------------------------------------------
def test_get_instance_unknown(repo: Repository) -> None:
    with pytest.raises(NotFound):
        repo.get_instance(12345)


def test_values_are_frozen(two: Repository) -> None:
    destination = two.get_destination("pacs")
    with pytest.raises(dataclasses.FrozenInstanceError):
        destination.port = 1  # type: ignore[misc]


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    repo = Repository(engine, clock=lambda: dt.datetime(2026, 1, 1))
    with pytest.raises(Exception, match="naive datetime"):
        repo.add_destination("pacs", "PACS", "h", 104)


# -- concurrency ----------------------------------------------------------------------------
def _writer(url: str, worker: int, count: int, start: Any) -> None:
    engine = make_engine(url)
    repo = Repository(engine)
    start.wait(30)
    for n in range(count):
        key = worker * 100_000 + n
        repo.record_instances([instance(key, "pacs", uid=f"1.2.{worker}.{n}")])
        if n % 10 == 0:
            repo.rules_version()
            repo.instance_counts()
    engine.dispose()


def test_concurrent_writers_in_two_processes(two: Repository, url: str, engine: Engine) -> None:
    per_process = 150
    # fork: the test module is not importable by name in a spawned child (importlib mode);
    # each child makes its own engine, as every process of the node does.
    context = multiprocessing.get_context("fork")
    start = context.Event()
    processes = [context.Process(target=_writer, args=(url, w, per_process, start)) for w in (1, 2)]
    for process in processes:
        process.start()
    start.set()
    # This process writes too, while the others do.
    for n in range(50):
        two.add_source(f"S{n}")
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]  # no "database is locked"
    assert count(engine, "instances") == 2 * per_process
    assert count(engine, "jobs") == 2 * per_process
    assert len(two.list_sources()) == 50


def test_instance_counts_by_state(two: Repository) -> None:
    assert two.instance_counts() == {}
    two.record_instances([instance(1, "pacs"), instance(2), instance(3)])
    assert two.instance_counts() == {"routed": 1, "unrouted": 2}
