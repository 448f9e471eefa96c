"""Least privilege: a private redis-server loaded with the generated ACL file; each
daemon's user can do its own work through the real runtime and is refused outside
its scope (docs/security.md). The refusal matrix runs every forbidden operation for
every user against a real redis-server (Redis >= 7.0: functions, selectors)."""

from __future__ import annotations

import fnmatch
import hashlib
import stat
import time
from pathlib import Path

import pytest
import redis

from qe import acl, config, functions, streams, topology
from qe.clock import Clock
from qe.contracts import DLQ_STREAM, L1, STREAM_TYPES, Control, Intent, intent_id_for, make_event
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until
from tests.support.raw_streams import copy
from tests.support.redis_server import RedisServer

RULES = config.load_rules(REPO / "etc" / "risk_rules.yaml")


@pytest.fixture
def acl_redis(tmp_path: Path):
    secrets_dir = tmp_path / "secrets"
    acl_file = acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    server = RedisServer(tmp_path / "redis", extra=["--aclfile", str(acl_file)]).start_with_auth(
        "qe-admin", acl.password_file(secrets_dir, acl.ADMIN).read_text().strip()
    )
    yield server, secrets_dir
    server.stop()


def client(server: RedisServer, secrets_dir: Path, daemon: str) -> redis.Redis:
    settings = config.load_settings({"QE_REDIS_URL": server.url, "QE_REDIS_SECRETS_DIR": str(secrets_dir)})
    return streams.connect(settings, RULES, retry_commands=False, user=daemon)


def event(payload, key: str):
    return make_event(payload, idempotency_key=key, source="test", ts_ns=time.time_ns())


def intent(key: str) -> Intent:
    return Intent(
        intent_id=intent_id_for(key), intent_type="SOFT_DERISK", symbol="CIM PRB", side="SELL", qty=100,
        order_type="LMT", limit_price=24.8, bucket="LT", classification="LT_LONG_DEC", priority=60, ttl_s=60,
        created_ns=time.time_ns(), risk_delta_gross_pct=-0.2, reason="acl test",
    )


def refused(action) -> str:
    """Run an action that must be refused by the ACL; returns "NOPERM: <message>"."""
    with pytest.raises(redis.exceptions.ResponseError) as raised:
        action()
    error = raised.value
    # Plain commands raise NoPermissionError; a refusal inside the Lua commit comes back
    # as a script error saying the script's user cannot access the key.
    text = str(error)
    if isinstance(error, redis.exceptions.NoPermissionError) or "can't access at least one of the keys" in text \
            or "can't run this command" in text:
        return f"NOPERM: {text}"
    return text


def test_secrets_are_private_files_and_the_acl_file_holds_only_hashes(tmp_path):
    secrets_dir = tmp_path / "secrets"
    acl_file = acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    text = acl_file.read_text()
    assert "user default off" in text
    for daemon in acl.ACCESS:
        path = acl.password_file(secrets_dir, daemon)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() not in text  # only the SHA-256 is in the ACL file
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    # Re-rendering keeps the passwords (daemons already running keep working).
    before = {d: acl.password_file(secrets_dir, d).read_text() for d in acl.ACCESS}
    acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    assert before == {d: acl.password_file(secrets_dir, d).read_text() for d in acl.ACCESS}


def test_the_admin_password_can_live_apart_from_the_daemons(tmp_path):
    """A host keeps qe-admin's password (FUNCTION LOAD) where no daemon can read it."""
    secrets_dir, admin_dir = tmp_path / "secrets", tmp_path / "admin"
    text = acl.write_acl_file(tmp_path / "users.acl", secrets_dir, admin_dir).read_text()
    admin_file = acl.password_file(admin_dir, acl.ADMIN)
    assert not acl.password_file(secrets_dir, acl.ADMIN).exists()
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600 and stat.S_IMODE(admin_dir.stat().st_mode) == 0o700
    digest = hashlib.sha256(admin_file.read_text().strip().encode()).hexdigest()
    assert f"user qe-admin on #{digest} " in text
    before = admin_file.read_text()
    acl.write_acl_file(tmp_path / "users.acl", secrets_dir, admin_dir)
    assert admin_file.read_text() == before


def test_default_user_is_disabled(acl_redis):
    server, _secrets = acl_redis
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port).ping()


def test_each_daemon_is_refused_outside_its_scope(acl_redis):
    server, secrets_dir = acl_redis
    market_data = client(server, secrets_dir, "market-data")
    decision = client(server, secrets_dir, "decision")
    execution = client(server, secrets_dir, "execution")
    exposure = client(server, secrets_dir, "exposure")
    operator = client(server, secrets_dir, "cli")

    # Own work is allowed: market data publishes quotes, the Brain publishes intents.
    streams.Publisher(market_data, RULES).publish("ev.l1", event(L1(symbol="CIM PRB", bid=24.8, ask=24.9), "l1:1"))
    streams.Publisher(decision, RULES).publish("ev.intents", event(intent("intent:acl:1"), "intent:acl:1"))
    assert operator.xlen("ev.intents") == 1 and operator.xlen("ev.l1") == 1

    # Only the Brain writes ev.intents: market data, execution and the operator cannot.
    for name, user in (("market-data", market_data), ("execution", execution), ("cli", operator)):
        message = refused(lambda: user.xadd("ev.intents", {"event": "{}"}))
        assert "NOPERM" in message, (name, message)
    # ... not even through the runtime's commit function.
    assert "NOPERM" in refused(
        lambda: streams.Publisher(market_data, RULES).publish("ev.intents", event(intent("intent:acl:2"), "intent:acl:2"))
    )
    # Only execution reads ev.intents: the Brain cannot consume it.
    assert "NOPERM" in refused(lambda: decision.xgroup_create("ev.intents", "decision_engine", id="0"))
    # Only the qe tool writes the operator control stream.
    for user in (decision, execution, market_data):
        assert "NOPERM" in refused(lambda: user.xadd("ev.control", {"event": "{}"}))
    streams.Publisher(operator, RULES).publish("ev.control", event(Control(command="halt", reason="t", operator="op"), "control:1"))
    # State keys belong to their owner.
    assert "NOPERM" in refused(lambda: market_data.hset("state:decision", "mode", "NORMAL"))
    assert "NOPERM" in refused(lambda: exposure.hset("state:orders", "x", "{}"))
    assert "NOPERM" in refused(lambda: execution.delete("state:exposure"))
    assert "NOPERM" in refused(lambda: exposure.flushall())
    assert "NOPERM" in refused(lambda: decision.config_get("*"))


def test_execution_consumes_intents_through_the_runtime_under_its_acl(acl_redis):
    server, secrets_dir = acl_redis
    streams.Publisher(client(server, secrets_dir, "decision"), RULES).publish("ev.intents", event(intent("intent:acl:3"), "intent:acl:3"))
    execution = client(server, secrets_dir, "execution")

    class Forward:
        streams = ("ev.intents", "ev.l1", "ev.control", "ev.session")
        tick_interval_s = None

        def load(self, r) -> None:
            pass

        def handle(self, received, effects) -> None:
            effects.hset("state:orders", {received.idempotency_key: "{}"})

        def tick(self, now_ns, effects) -> None:
            pass

    consumer = streams.Consumer(r=execution, daemon="execution", group="execution_service", handler=Forward(),
                                rules=RULES, clock=Clock(), consumer_name="execution-acl")
    for _ in range(20):
        consumer.run_once()
        if execution.hexists("state:orders", "intent:acl:3"):
            break
    assert execution.hexists("state:orders", "intent:acl:3")
    assert execution.xpending(copy("ev.intents", "execution_service"), "execution_service")["pending"] == 0  # XACK allowed
    assert execution.hgetall("state:daemon:execution")  # heartbeat allowed


def test_a_real_daemon_runs_under_its_user_and_never_logs_its_password(acl_redis, tmp_path):
    server, secrets_dir = acl_redis
    env = daemon_env(server.url, QE_REDIS_SECRETS_DIR=str(secrets_dir), QE_CONSUMER_NAME="session-acl")
    session = DaemonProcess(console_script("qe-session"), env, tmp_path / "session.log").start()
    operator = client(server, secrets_dir, "cli")
    wait_until(lambda: operator.xlen("ev.session") >= 2, timeout=30, message="session publishing under its ACL user")
    assert session.terminate() == 0
    log = session.output()
    assert "NOPERM" not in log
    assert acl.password_file(secrets_dir, "session").read_text().strip() not in log
    assert operator.acl_whoami() == "qe-cli"


# --- the refusal matrix: every user x every forbidden operation --------------------------------

USERS = list(acl.ACCESS)
ALL_STREAMS = [*STREAM_TYPES, DLQ_STREAM]
GROUPS = {daemon: access.group for daemon, access in acl.ACCESS.items() if access.group}
# Every group's delivery copy of every stream it consumes (qe.topology), and whose it is.
COPIES = {copy(stream, group): group for group, consumed in topology.CONSUMES.items() for stream in consumed}


def own_copies(daemon: str) -> set[str]:
    return {key for key, group in COPIES.items() if group == GROUPS.get(daemon)}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """One server for the whole matrix, every stream present with every daemon's group."""
    tmp_path = tmp_path_factory.mktemp("acl-matrix")
    secrets_dir = tmp_path / "secrets"
    acl_file = acl.write_acl_file(tmp_path / "users.acl", secrets_dir)
    server = RedisServer(tmp_path / "redis", extra=["--aclfile", str(acl_file)]).start_with_auth(
        "qe-admin", acl.password_file(secrets_dir, acl.ADMIN).read_text().strip()
    )
    clients = {daemon: client(server, secrets_dir, daemon) for daemon in (*acl.ACCESS, acl.ADMIN)}
    # Set up as the owners would: each consumer creates its own groups through the function.
    for daemon, access in acl.ACCESS.items():
        for stream in access.consumes:
            clients[daemon].fcall("qe_group_create", 0, stream, access.group, "0", "")
    for stream in ALL_STREAMS:
        writer = next(d for d, a in acl.ACCESS.items() if stream in a.publishes) if stream != DLQ_STREAM else "prints"
        clients[writer].fcall("qe_append", 0, stream, "", "event", "{}")  # the stream and its copies
    assert all(clients["cli"].xlen(key) == 1 for key in COPIES)
    yield server, clients
    server.stop()


def streams_readable(daemon: str) -> set[str]:
    """The streams and copies a daemon may read: what it reads, its own copies."""
    access = acl.ACCESS[daemon]
    if "*" in access.reads:
        return set(ALL_STREAMS) | set(COPIES)
    return own_copies(daemon) | {s for s in ALL_STREAMS if s in access.reads}


def test_redis_supports_what_the_acl_relies_on(matrix):
    _server, clients = matrix
    hello = clients["cli"].execute_command("HELLO")  # INFO is not granted; HELLO names the version
    version = hello[hello.index(b"version") + 1].decode() if isinstance(hello, list) else hello[b"version"].decode()
    assert tuple(int(part) for part in version.split(".")[:2]) >= (7, 0), version  # FUNCTION, selectors
    # The library is loaded by qe-admin; every daemon can check its version.
    for daemon in acl.ACCESS:
        assert functions.loaded_version(clients[daemon]) == functions.VERSION


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_deletes_expires_or_trims_a_stream(matrix, daemon):
    """Retention is the producer's XADD MAXLEN/MINID only: no DEL, UNLINK, EXPIRE, XTRIM,
    RENAME of any stream, by anyone (decision could DEL ev.intents, consumers ev.dlq)."""
    _server, clients = matrix
    r = clients[daemon]
    for stream in [*ALL_STREAMS, *COPIES]:
        for name, action in (
            ("DEL", lambda: r.delete(stream)),
            ("UNLINK", lambda: r.unlink(stream)),
            ("EXPIRE", lambda: r.expire(stream, 1)),
            ("PEXPIRE", lambda: r.pexpire(stream, 1)),
            ("XTRIM", lambda: r.xtrim(stream, maxlen=0)),
            ("RENAME", lambda: r.rename(stream, stream + ".x")),
            ("XSETID", lambda: r.execute_command("XSETID", stream, "99999999999999-0")),
        ):
            if name == "XTRIM" and stream in own_copies(daemon):
                continue  # a group trims what it has acknowledged from its own copy (test below)
            assert "NOPERM" in refused(action), (daemon, name, stream)
        # ... nor through the commit function (nothing applied).
        effects = streams.Effects(streams.StreamPolicy(RULES.streams, daemon))
        effects.command("DEL", stream)
        assert "NOPERM" in refused(lambda: streams.commit(r, effects)), (daemon, stream)
        assert clients["cli"].exists(stream) == 1


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_uses_another_daemons_consumer_group_through_the_runtime(matrix, daemon):
    """Group ownership (ACL marker key qe:group:<group>) checked by the functions: creating,
    or acknowledging in, another daemon's group is refused, and so is an XACK smuggled in
    as a commit op. Direct commands are refused by Redis itself (next test)."""
    _server, clients = matrix
    r = clients[daemon]
    own = GROUPS.get(daemon)
    for other in sorted(set(GROUPS.values()) - {own}):
        for stream in acl.ACCESS[daemon].consumes or ("ev.l1",):
            assert "NOPERM" in refused(lambda: r.fcall("qe_group_create", 0, stream, other, "0", "")), (daemon, other)
            entry_id = clients["cli"].xrevrange(stream, count=1)[0][0].decode()
            effects = streams.Effects(streams.StreamPolicy(RULES.streams, daemon))
            effects.acks.append((stream, entry_id))
            assert "NOPERM" in refused(lambda: streams.commit(r, effects, other, "intruder")), (daemon, other, stream)
    for stream in acl.ACCESS[daemon].consumes or ("ev.l1",):
        group = own or "x"
        effects = streams.Effects(streams.StreamPolicy(RULES.streams, daemon))
        effects.command("XACK", stream, group, "0-1")
        assert "NOPERM" in refused(lambda: streams.commit(r, effects)), (daemon, stream)
        # Group administration is nobody's, not even on its own copy: destroy, move, drop consumers.
        for key in (stream, copy(stream, group)):
            for sub in (("DESTROY", key, group), ("SETID", key, group, "$"), ("DELCONSUMER", key, group, "c"),
                        ("CREATECONSUMER", key, group, "c")):
                assert "NOPERM" in refused(lambda: r.execute_command("XGROUP", *sub)), (daemon, sub)


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_reaches_another_daemons_group_even_with_direct_commands(matrix, daemon):
    """Each group lives only on its own delivery copies (qe.topology), keys only its owner's
    user may touch: XREADGROUP, XACK, XCLAIM, XAUTOCLAIM, XPENDING and XGROUP are refused
    by Redis itself on the streams and on every other group's copy, whatever group they
    name, for a client that bypasses the runtime as much as for the runtime. (Before the
    copies, alerts could XACK in decision_engine's group on ev.l1.)"""
    _server, clients = matrix
    r = clients[daemon]
    readable = streams_readable(daemon)  # XPENDING only looks: allowed where it may read (qe status)
    for key in sorted(set(ALL_STREAMS) | (set(COPIES) - own_copies(daemon))):
        for group in sorted(set(GROUPS.values())):
            actions = [
                ("XREADGROUP", lambda: r.xreadgroup(group, "intruder", {key: ">"}, count=1)),
                ("XREADGROUP pending", lambda: r.xreadgroup(group, "intruder", {key: "0"}, count=1)),
                ("XACK", lambda: r.xack(key, group, "0-1")),
                ("XCLAIM", lambda: r.xclaim(key, group, "intruder", 0, ["0-1"])),
                ("XAUTOCLAIM", lambda: r.xautoclaim(key, group, "intruder", 0)),
                ("XGROUP CREATE", lambda: r.xgroup_create(key, group, id="0")),
                ("XGROUP SETID", lambda: r.xgroup_setid(key, group, "$")),
                ("XGROUP DESTROY", lambda: r.xgroup_destroy(key, group)),
            ]
            if key not in readable:
                actions.append(("XPENDING", lambda: r.xpending(key, group)))
            for name, action in actions:
                assert "NOPERM" in refused(action), (daemon, name, key, group)
    alerts_copy = copy("ev.l1", "alerts")
    if daemon == "alerts":  # on its own copy, decision_engine's group does not exist at all
        assert "NOGROUP" in refused(lambda: r.xreadgroup("decision_engine", "intruder", {alerts_copy: ">"}, count=1))


@pytest.mark.parametrize("daemon", [d for d in USERS if GROUPS.get(d) in topology.CONSUMES])
def test_a_daemon_works_its_own_copies_and_no_group_is_on_a_stream(matrix, daemon):
    """The owner reads, acknowledges and trims its own copy (the runtime's commands);
    the streams themselves carry no group at all."""
    _server, clients = matrix
    r, group = clients[daemon], GROUPS[daemon]
    key = sorted(own_copies(daemon))[0]
    assert r.xpending(key, group)["pending"] >= 0
    assert r.xtrim(key, minid="0-1", approximate=False) == 0  # nothing below the first id
    for stream in ALL_STREAMS:
        assert clients["cli"].xinfo_groups(stream) == [], stream
    for key, owner in COPIES.items():
        assert [g["name"].decode() for g in clients["cli"].xinfo_groups(key)] == [owner], key


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_forges_another_producers_dedupe_marker(matrix, daemon):
    """Markers live under dedupe:<producer>:; only the producer writes its own."""
    _server, clients = matrix
    r = clients[daemon]
    for other in sorted(set(acl.ACCESS) - {daemon}):
        key = f"dedupe:{other}:ev.alerts:forged"
        assert "NOPERM" in refused(lambda: r.set(key, "1", nx=True, ex=60)), (daemon, other)
        assert "NOPERM" in refused(lambda: r.delete(key)), (daemon, other)
        # Through the commit, an append guarded by a forged marker applies nothing.
        effects = streams.Effects(streams.StreamPolicy(RULES.streams, other))
        own_stream = (acl.ACCESS[daemon].publishes or ("ev.control",))[0]
        op = effects.policy.xadd_op(own_stream, {"event": "{}"}, "forged")
        if op[1]:  # a stream with producer-side dedupe
            effects.ops.append(op)
            assert "NOPERM" in refused(lambda: streams.commit(r, effects)), (daemon, other)
    assert list(clients["cli"].scan_iter("dedupe:*forged*")) == []
    # The old unprefixed markers are nobody's either.
    assert "NOPERM" in refused(lambda: r.set("dedupe:ev.intents:x", "1"))


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_runs_its_own_code_in_redis(matrix, daemon):
    """No EVAL/EVALSHA/SCRIPT/FUNCTION for daemons: only FCALL of the loaded library."""
    _server, clients = matrix
    r = clients[daemon]
    for name, action in (
        ("EVAL", lambda: r.eval("while true do end", 0)),
        ("EVAL_RO", lambda: r.execute_command("EVAL_RO", "return 1", 0)),
        ("EVALSHA", lambda: r.evalsha("a" * 40, 0)),
        ("SCRIPT LOAD", lambda: r.script_load("return 1")),
        ("SCRIPT KILL", lambda: r.script_kill()),
        ("SCRIPT FLUSH", lambda: r.script_flush()),
        ("FUNCTION LOAD", lambda: r.function_load(functions.LIBRARY, replace=True)),
        ("FUNCTION DELETE", lambda: r.function_delete("qe")),
        ("FUNCTION FLUSH", lambda: r.function_flush()),
        ("FUNCTION KILL", lambda: r.function_kill()),
        ("FUNCTION RESTORE", lambda: r.function_restore(b"x")),
    ):
        assert "NOPERM" in refused(action), (daemon, name)


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_reads_a_stream_it_does_not_consume(matrix, daemon):
    _server, clients = matrix
    r = clients[daemon]
    for stream in sorted(set(ALL_STREAMS) - streams_readable(daemon)):
        for name, action in (
            ("XRANGE", lambda: r.xrange(stream, count=1)),
            ("XREVRANGE", lambda: r.xrevrange(stream, count=1)),
            ("XREAD", lambda: r.xread({stream: "0"}, count=1)),
            ("count_after", lambda: r.fcall_ro("qe_count_after", 0, stream, "0-0", 10)),
        ):
            assert "NOPERM" in refused(action), (daemon, name, stream)


@pytest.mark.parametrize("daemon", USERS)
def test_no_user_writes_outside_its_scope(matrix, daemon):
    _server, clients = matrix
    r = clients[daemon]
    access = acl.ACCESS[daemon]
    writable = set(access.publishes) | ({DLQ_STREAM} if access.consumes else set())
    writable |= {key for command, key in access.extra_write_commands if command == "xadd"}
    for stream in sorted(set(ALL_STREAMS) - writable):
        assert "NOPERM" in refused(lambda: r.xadd(stream, {"event": "{}"})), (daemon, stream)
    for other, other_access in acl.ACCESS.items():
        if other == daemon:
            continue
        assert "NOPERM" in refused(lambda: r.hset(f"state:daemon:{other}", "ts_ns", "1")), (daemon, other)
        for pattern in other_access.writes:
            key = pattern.replace("*", "x")
            if not any(fnmatch.fnmatchcase(key, own) for own in access.writes):
                assert "NOPERM" in refused(lambda: r.hset(key, "x", "1")), (daemon, key)
                assert "NOPERM" in refused(lambda: r.delete(key)), (daemon, key)
    for name, action in (
        ("FLUSHALL", lambda: r.flushall()),
        ("FLUSHDB", lambda: r.flushdb()),
        ("CONFIG GET", lambda: r.config_get("*")),
        ("ACL SETUSER", lambda: r.acl_setuser("x")),
        ("ACL LIST", lambda: r.acl_list()),
        ("KEYS", lambda: r.keys("*")),
        ("REPLICAOF", lambda: r.execute_command("REPLICAOF", "NO", "ONE")),
        ("BGREWRITEAOF", lambda: r.bgrewriteaof()),
        ("CLIENT KILL", lambda: r.execute_command("CLIENT", "KILL", "ID", "1")),
        ("SHUTDOWN", lambda: r.execute_command("SHUTDOWN", "NOSAVE")),
    ):
        assert "NOPERM" in refused(action), (daemon, name)


def test_a_refused_op_in_a_commit_applies_nothing(matrix):
    """The function checks every op before the first write (a Lua error after a write
    would leave that write in place)."""
    _server, clients = matrix
    decision = clients["decision"]
    effects = streams.Effects(streams.StreamPolicy(RULES.streams, "decision"))
    effects.hset("state:decision:acl-test", {"written": "1"})
    effects.publish("ev.control", event(Control(command="halt", reason="t", operator="op"), "control:forged"))
    assert "NOPERM" in refused(lambda: streams.commit(decision, effects))
    assert clients["cli"].exists("state:decision:acl-test") == 0
    # The same commit without the forbidden op applies.
    effects = streams.Effects(streams.StreamPolicy(RULES.streams, "decision"))
    effects.hset("state:decision:acl-test", {"written": "1"})
    streams.commit(decision, effects)
    assert clients["cli"].hget("state:decision:acl-test", "written") == b"1"


def test_the_runtime_refuses_to_consume_as_another_daemons_group(matrix):
    """A daemon misconfigured with another's group never reads: group creation goes
    through the checked function and fails before the first XREADGROUP."""
    _server, clients = matrix
    alerts = clients["alerts"]
    decision_copy = copy("ev.l1", "decision_engine")
    before = {g["name"]: g["last-delivered-id"] for g in clients["cli"].xinfo_groups(decision_copy)}

    class Nothing:
        streams = ("ev.l1",)
        tick_interval_s = None

        def load(self, r) -> None:
            pass

        def handle(self, received, effects) -> None:
            raise AssertionError("must not be handed anything")

        def tick(self, now_ns, effects) -> None:
            pass

    consumer = streams.Consumer(r=alerts, daemon="alerts", group="decision_engine", handler=Nothing(),
                                rules=RULES, clock=Clock(), consumer_name="alerts-as-decision")
    consumer._backoff = type("NoWait", (), {"compute": staticmethod(lambda failures: 0.0)})()
    for _ in range(3):
        consumer.run_once()
    after = {g["name"]: g["last-delivered-id"] for g in clients["cli"].xinfo_groups(decision_copy)}
    assert after == before
    pending = clients["cli"].xpending_range(decision_copy, "decision_engine", "-", "+", 1000)
    assert all(p["consumer"] != b"alerts-as-decision" for p in pending)


def test_admin_loads_functions_and_touches_no_key(matrix):
    _server, clients = matrix
    admin = clients[acl.ADMIN]
    assert functions.load(admin) == "qe"
    for action in (lambda: admin.get("state:decision"), lambda: admin.xrange("ev.intents"), lambda: admin.flushall(),
                   lambda: admin.config_get("*"), lambda: admin.eval("return 1", 0), lambda: admin.fcall("qe_commit", 0, "", "", "[]", "[]")):
        assert "NOPERM" in refused(action)


def test_alerts_sees_lag_of_every_group_without_reading_the_streams(matrix):
    """Alerts reads stream metadata only where it does not consume: the lag of a group it
    cannot count is the one its owner last counted (`lag:<stream>` in its record)."""
    _server, clients = matrix
    alerts, cli = clients["alerts"], clients["cli"]
    for _ in range(3):
        clients["decision"].fcall("qe_append", 0, "ev.intents", "", "event", "{}")
    # Execution has read one entry: its position is inside the stream, so the lag must be counted.
    clients["execution"].xreadgroup("execution_service", "e1", {copy("ev.intents", "execution_service"): ">"}, count=1)
    counted = {g["name"].decode(): g["lag"] for g in streams.group_lags(cli, ["ev.intents"])["ev.intents"]}
    assert counted["execution_service"] >= 3
    seen = {g["name"].decode(): g["lag"] for g in streams.group_lags(alerts, ["ev.intents"])["ev.intents"]}
    assert seen["execution_service"] is None  # not counted and nothing reported yet: unknown, never a guess
    clients["execution"].hset("state:daemon:execution", "lag:ev.intents", counted["execution_service"])
    seen = {g["name"].decode(): g["lag"] for g in streams.group_lags(alerts, ["ev.intents"])["ev.intents"]}
    assert seen["execution_service"] == counted["execution_service"]


def test_a_daemon_started_before_the_functions_are_loaded_waits_for_them(acl_redis):
    """The demo and supervisord start daemons while the admin step runs: until the library
    is there a consumer backs off (a Redis error, never a crash), then works."""
    server, secrets_dir = acl_redis
    admin = client(server, secrets_dir, acl.ADMIN)
    admin.function_delete(functions.LIBRARY_NAME)
    execution = client(server, secrets_dir, "execution")
    assert functions.loaded_version(execution) is None
    with pytest.raises(functions.FunctionsMissing, match="load-functions"):
        functions.check(execution)

    class Record:
        streams = ("ev.intents",)
        tick_interval_s = None

        def load(self, r) -> None:
            pass

        def handle(self, received, effects) -> None:
            effects.hset("state:orders", {received.idempotency_key: "{}"})

        def tick(self, now_ns, effects) -> None:
            pass

    consumer = streams.Consumer(r=execution, daemon="execution", group="execution_service", handler=Record(),
                                rules=RULES, clock=Clock(), consumer_name="execution-early")
    consumer._backoff = type("NoWait", (), {"compute": staticmethod(lambda failures: 0.0)})()
    consumer.run_once()  # no library: backs off, does not raise
    assert consumer._redis_failures == 1
    assert functions.load(admin) == functions.LIBRARY_NAME
    streams.Publisher(client(server, secrets_dir, "decision"), RULES).publish(
        "ev.intents", event(intent("intent:acl:early"), "intent:acl:early"))
    for _ in range(20):
        consumer.run_once()
        if execution.hexists("state:orders", "intent:acl:early"):
            break
    assert execution.hexists("state:orders", "intent:acl:early")
    # The producer's marker is under its own prefix.
    assert client(server, secrets_dir, "cli").exists("dedupe:decision:ev.intents:intent:acl:early") == 1
