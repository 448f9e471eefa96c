"""Configuration hardening (issue 12): every start-up failure exits 78 naming the
field, without a traceback, with bounded output and no password in it.

The real console scripts run as subprocesses with a crafted environment. Their
Redis URL points at a closed port (127.0.0.1:1): a case that wrongly passed the
configuration checks would hang retrying (and time out), never touch a real Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from qe import config
from tests.support.processes import REPO, VENV_BIN, daemon_env, wait_until

RULES_TEXT = (REPO / "etc" / "risk_rules.yaml").read_text()
UNREACHABLE = "redis://127.0.0.1:1/0"
PASSWORD = "hunter2-s3cr3t"
SESSION = [str(VENV_BIN / "qe-session")]
CHECK = [str(VENV_BIN / "qe"), "check-config"]
PROGRAMS = {"qe-session": SESSION, "qe check-config": CHECK}


def run(command: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=daemon_env(UNREACHABLE, **env), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def assert_config_failure(result: subprocess.CompletedProcess[str], program: str, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == config.EX_CONFIG, output[-2000:]
    assert f"{program}: invalid configuration:" in result.stderr
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in output
    assert PASSWORD not in output
    # Bounded: at most 50 lines (+ the "... N more lines" line), about 8 KiB.
    assert len(result.stderr.splitlines()) <= config.MAX_ERROR_LINES + 1
    assert len(result.stderr.encode()) <= config.MAX_ERROR_BYTES + 200


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line == needle:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} not found")


def without_section(name: str) -> str:
    """The shipped rules with one top-level section (and only it) removed."""
    lines = RULES_TEXT.splitlines(keepends=True)
    start = line_of(RULES_TEXT, f"{name}:") - 1
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\n")) or not lines[end].strip()):
        end += 1
    return "".join(lines[:start] + lines[end:])


def without_key(section: str, key: str) -> str:
    document = yaml.safe_load(RULES_TEXT)
    del document[section][key]
    return yaml.safe_dump(document, sort_keys=False)


def replaced(old: str, new: str) -> str:
    assert RULES_TEXT.count(old) == 1, old
    return RULES_TEXT.replace(old, new)


DUPLICATE_SECTION = RULES_TEXT + "\nexposure:\n  hard_cap_pct: 500\n"
DUPLICATE_KEY = replaced("  hard_cap_pct: 130\n", "  hard_cap_pct: 130\n  hard_cap_pct: 500\n")
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
) + "\n"
# 5000 unknown keys: 5000 validation errors; the output must stay bounded.
MANY_ERRORS = RULES_TEXT.replace("\nexposure:\n", "\nexposure:\n" + "".join(f"  bogus_{i}: 1\n" for i in range(5000)), 1)

RULES_CASES = {
    "duplicate section": (
        DUPLICATE_SECTION,
        f"duplicate key 'exposure' at line {line_of(DUPLICATE_SECTION, 'exposure:', 2)} "
        f"(first at line {line_of(DUPLICATE_SECTION, 'exposure:')})",
    ),
    "duplicate key": (
        DUPLICATE_KEY,
        f"duplicate key 'exposure.hard_cap_pct' at line {line_of(DUPLICATE_KEY, '  hard_cap_pct: 500')} "
        f"(first at line {line_of(DUPLICATE_KEY, '  hard_cap_pct: 130')})",
    ),
    "no exposure section": (without_section("exposure"), "exposure: Field required"),
    "no execution section": (without_section("execution"), "execution: Field required"),
    "no derisk section": (without_section("derisk"), "derisk: Field required"),
    "no plausibility section": (without_section("plausibility"), "plausibility: Field required"),
    "no hard cap": (without_key("exposure", "hard_cap_pct"), "exposure.hard_cap_pct: Field required"),
    "no cap recovery target": (
        without_key("exposure", "cap_recovery_target_pct"), "exposure.cap_recovery_target_pct: Field required"
    ),
    "no buckets": (without_key("exposure", "buckets"), "exposure.buckets: Field required"),
    "no bucket max": (
        replaced("    LT:      {target_pct: 80, max_pct: 90}", "    LT:      {target_pct: 80}"),
        "exposure.buckets.LT.max_pct: Field required",
    ),
    "no max order notional": (
        without_key("execution", "max_order_notional"), "execution.max_order_notional: Field required"
    ),
    "no liquidity divisor": (
        without_key("execution", "liquidity_adv_divisor"), "execution.liquidity_adv_divisor: Field required"
    ),
    "no min order qty": (without_key("execution", "min_order_qty"), "execution.min_order_qty: Field required"),
    "no TTLs": (without_key("execution", "ttl_s_by_category"), "execution.ttl_s_by_category: Field required"),
    "no derisk target": (without_key("derisk", "target_gross_pct"), "derisk.target_gross_pct: Field required"),
    "no collar": (without_key("plausibility", "collar_pct"), "plausibility.collar_pct: Field required"),
    "bool as a cap": (
        replaced("  hard_cap_pct: 130\n", "  hard_cap_pct: yes\n"),
        "exposure.hard_cap_pct: Input should be a valid number (got True)",
    ),
    "string as a limit": (
        replaced("  max_order_notional: 250000 ", "  max_order_notional: '250000' "),
        "execution.max_order_notional: Input should be a valid number (got '250000')",
    ),
    "inf as a limit": (
        replaced("  max_order_notional: 250000 ", "  max_order_notional: .inf "),
        "execution.max_order_notional: Input should be a finite number (got inf)",
    ),
    "float as a share count": (
        replaced("  min_order_qty: 100            #", "  min_order_qty: 100.0          #"),
        "execution.min_order_qty: Input should be a valid integer (got 100.0)",
    ),
    "billion laughs": (BILLION_LAUGHS, "line 1: YAML anchors and aliases (&name, *name) are not allowed"),
    "merge key": (RULES_TEXT + "extra:\n  <<: {a: 1}\n", "merge keys (<<) are not allowed"),
    "deep nesting": ("x: " + "[" * 100_000 + "\n", f"nested deeper than {config.MAX_YAML_DEPTH} levels"),
    "not a mapping": ("- just\n- a list\n", "top level must be a mapping"),
    "many errors": (MANY_ERRORS, "exposure.bogus_0: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("case", RULES_CASES)
def test_rules_file_problems_exit_78_naming_the_field(tmp_path, program, case):
    text, message = RULES_CASES[case]
    path = tmp_path / "risk_rules.yaml"
    path.write_text(text)
    started = time.monotonic()
    result = run(PROGRAMS[program], QE_CONFIG=str(path))
    assert_config_failure(result, program, message)
    assert str(path) in result.stderr
    assert time.monotonic() - started < 20  # refused quickly, never expanded


def test_many_errors_are_cut_with_a_count(tmp_path):
    path = tmp_path / "risk_rules.yaml"
    path.write_text(MANY_ERRORS)
    result = run(CHECK, QE_CONFIG=str(path))
    assert_config_failure(result, "qe check-config", "exposure.bogus_0")
    last = result.stderr.splitlines()[-1]
    assert last.startswith("... ") and last.endswith(" more lines")
    assert int(last.split()[1]) > 4900


FILE_CASES = {
    "oversized": (lambda p: p.write_text(RULES_TEXT + "#" * (2 << 20) + "\n"), "larger than 1048576 bytes"),
    "NUL byte": (lambda p: p.write_bytes(RULES_TEXT.encode()[:100] + b"\0" + RULES_TEXT.encode()[100:]),
                 "binary, not text (NUL byte at offset 100)"),
    "not UTF-8": (lambda p: p.write_bytes(b"schema_version: 1\n# caf\xe9\n"), "not UTF-8 text (invalid byte at offset 23)"),
    "a directory": (lambda p: p.mkdir(), "cannot read: Is a directory"),
    "missing": (lambda p: None, "cannot read: No such file or directory"),
    "not a regular file": (lambda p: os.mkfifo(p), "not a regular file"),
}


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("case", FILE_CASES)
def test_unusable_rules_file_exits_78(tmp_path, program, case):
    make, message = FILE_CASES[case]
    path = tmp_path / "risk_rules.yaml"
    make(path)
    result = run(PROGRAMS[program], QE_CONFIG=str(path))
    assert_config_failure(result, program, f"{path}: {message}")


def secret_file(directory: Path, name: str, mode: int, text: str = PASSWORD + "\n") -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


def secrets_dir(tmp_path: Path, bad: str | None = None, bad_mode: int = 0o644) -> Path:
    """Every daemon's password file, 0600; `bad` missing (bad_mode None) or with bad_mode."""
    from qe import acl

    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    for daemon in acl.ACCESS:
        name = f"{acl.username(daemon)}.pass"
        if daemon != bad:
            secret_file(directory, name, 0o600)
        elif bad_mode is not None:
            secret_file(directory, name, bad_mode)
    return directory


# case -> (environment built in the test's tmp_path, message)
ENV_CASES = {
    "password file missing": (
        lambda tmp: {"QE_REDIS_PASSWORD_FILE": str(tmp / "nope.pass")},
        "QE_REDIS_PASSWORD_FILE: cannot read ",
    ),
    "password file 0644": (
        lambda tmp: {"QE_REDIS_PASSWORD_FILE": str(secret_file(tmp, "redis.pass", 0o644))},
        "QE_REDIS_PASSWORD_FILE: ",
    ),
    "password file empty": (
        lambda tmp: {"QE_REDIS_PASSWORD_FILE": str(secret_file(tmp, "empty.pass", 0o600, "\n"))},
        "QE_REDIS_PASSWORD_FILE: ",
    ),
    "hammer password file 0640": (
        lambda tmp: {"QE_HAMMER_PASSWORD_FILE": str(secret_file(tmp, "hammer.pass", 0o640))},
        "QE_HAMMER_PASSWORD_FILE: ",
    ),
    "per-daemon password file 0644": (
        lambda tmp: {"QE_REDIS_SECRETS_DIR": str(secrets_dir(tmp, bad="session"))},
        "QE_REDIS_SECRETS_DIR: ",
    ),
    "per-daemon password file missing": (
        lambda tmp: {"QE_REDIS_SECRETS_DIR": str(secrets_dir(tmp, bad="session", bad_mode=None))},
        "QE_REDIS_SECRETS_DIR: cannot read ",
    ),
    "Redis URL unparseable": (
        lambda tmp: {"QE_REDIS_URL": f"redis://u:{PASSWORD}@[::1:6379/0"},
        "QE_REDIS_URL: cannot be parsed",
    ),
    "Redis port out of range": (
        lambda tmp: {"QE_REDIS_URL": f"redis://u:{PASSWORD}@127.0.0.1:99999/0"},
        "QE_REDIS_URL: the port must be a number from 1 to 65535",
    ),
    "Redis port not a number": (
        lambda tmp: {"QE_REDIS_URL": f"redis://u:{PASSWORD}@127.0.0.1:6x79/0"},
        "QE_REDIS_URL: the port must be a number from 1 to 65535",
    ),
    "Redis port zero": (
        lambda tmp: {"QE_REDIS_URL": "redis://127.0.0.1:0/0"},
        "QE_REDIS_URL: the port must be a number from 1 to 65535",
    ),
    "Redis unknown scheme": (
        lambda tmp: {"QE_REDIS_URL": f"http://u:{PASSWORD}@127.0.0.1:1/0"},
        "QE_REDIS_URL: unknown scheme 'http'; use redis:// or rediss:// or unix://",
    ),
    "Redis database not a number": (
        lambda tmp: {"QE_REDIS_URL": "redis://127.0.0.1:1/x"},
        "QE_REDIS_URL: the database (path) must be a number",
    ),
    "Redis unknown option": (
        lambda tmp: {"QE_REDIS_URL": f"redis://127.0.0.1:1/0?password={PASSWORD}&bogus=1"},
        "QE_REDIS_URL: not usable by the Redis client",
    ),
    "metrics host unresolvable": (
        lambda tmp: {"QE_METRICS_HOST": "no-such-host.invalid"},
        "QE_METRICS_HOST: cannot resolve 'no-such-host.invalid'",
    ),
    "metrics port not a number": (
        lambda tmp: {"QE_METRICS_PORT": "91o1"},
        "QE_METRICS_PORT: Input should be a valid integer",
    ),
    "simulated clock speed nan": (
        lambda tmp: {"QE_CLOCK_START": "2026-11-20T15:35:00-05:00", "QE_CLOCK_SPEED": "nan"},
        "QE_CLOCK_SPEED must be a finite number > 0, got nan",
    ),
}


FILE_MODE_MESSAGES = {
    "password file 0644": "must not be readable by group/others (mode 0644; want 0600)",
    "password file empty": "is empty",
    "hammer password file 0640": "must not be readable by group/others (mode 0640; want 0600)",
    "per-daemon password file 0644": "qe-session.pass must not be readable by group/others (mode 0644; want 0600)",
    "per-daemon password file missing": "qe-session.pass: No such file or directory",
}


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("case", ENV_CASES)
def test_environment_problems_exit_78_naming_the_variable(tmp_path, program, case):
    make_env, message = ENV_CASES[case]
    result = run(PROGRAMS[program], **make_env(tmp_path))
    assert_config_failure(result, program, message)
    assert FILE_MODE_MESSAGES.get(case, "") in result.stderr


@pytest.fixture
def busy_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("program", PROGRAMS)
def test_metrics_port_in_use_exits_78(program, busy_port):
    result = run(PROGRAMS[program], QE_METRICS_PORT=str(busy_port))
    assert_config_failure(result, program, f"QE_METRICS_PORT: cannot listen on 127.0.0.1:{busy_port}: Address already in use")


def test_check_config_passes_a_good_configuration_and_names_what_it_checked(tmp_path):
    secrets = secrets_dir(tmp_path)
    result = run(CHECK, QE_REDIS_SECRETS_DIR=str(secrets))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    as_json = run([str(VENV_BIN / "qe"), "--json", "check-config"], QE_REDIS_SECRETS_DIR=str(secrets))
    import json

    report = json.loads(as_json.stdout)
    assert report["ok"] is True and report["symbols"] == 25
    assert {"exposure", "execution", "derisk", "plausibility"} <= set(report["sections"])
    assert "qe-session" in report["redis_users"] and "qe-cli" in report["redis_users"]


def test_universe_problems_exit_78(tmp_path):
    universe = tmp_path / "universe.csv"
    universe.write_bytes(b"symbol,bucket_hint,adv,group,ref_price\nPFF,LT,1000,etf,\xff\n")
    result = run(CHECK, QE_UNIVERSE=str(universe))
    assert_config_failure(result, "qe check-config", "not UTF-8 text")
    universe.write_text("symbol,bucket_hint,adv,group,ref_price\nPFF,LT,1000,etf,nan\n")
    result = run(CHECK, QE_UNIVERSE=str(universe))
    assert_config_failure(result, "qe check-config", "data row 1: adv must be 0..")
    # A daemon that loads the universe at start: the same failure, the same exit.
    result = run([str(VENV_BIN / "qe-market-data")], QE_UNIVERSE=str(universe))
    assert_config_failure(result, "qe-market-data", "ref_price a number in (0, ")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("  calendar: XNYS\n", "  calendar: XXXX\n", "session.calendar: unknown exchange calendar 'XXXX'"),
        ("    symbols: [PFF]\n", "    symbols: [PFF, NOPE]\n", "alerts.etf_guard.symbols: ['NOPE'] not in the universe"),
    ],
)
def test_check_config_checks_what_session_and_alerts_check_at_start(tmp_path, old, new, message):
    path = tmp_path / "risk_rules.yaml"
    path.write_text(replaced(old, new))
    result = run(CHECK, QE_CONFIG=str(path))
    assert_config_failure(result, "qe check-config", message)


def test_hammer_source_without_password_fails_check_config(tmp_path):
    path = tmp_path / "risk_rules.yaml"
    path.write_text(replaced("  source: ibkr ", "  source: hammer "))
    result = run(CHECK, QE_CONFIG=str(path))
    assert_config_failure(result, "qe check-config", "QE_HAMMER_PASSWORD_FILE: required when market_data.source is hammer")


def test_json_check_config_never_prints_the_url_password(busy_port):
    url = f"redis://qe-cli:{PASSWORD}@127.0.0.1:1/0?password={PASSWORD}"
    ok = run([str(VENV_BIN / "qe"), "--json", "check-config"], QE_REDIS_URL=url)
    assert ok.returncode == 0, ok.stderr
    assert PASSWORD not in ok.stdout + ok.stderr
    import json

    assert json.loads(ok.stdout)["redis_url"] == "redis://qe-cli:***@127.0.0.1:1/0?password=***"
    # A failure, as JSON on stdout and as text on stderr: still no password.
    failed = run([str(VENV_BIN / "qe"), "--json", "check-config"], QE_REDIS_URL=url, QE_METRICS_PORT=str(busy_port))
    assert failed.returncode == config.EX_CONFIG
    assert PASSWORD not in failed.stdout + failed.stderr
    report = json.loads(failed.stdout)
    assert report["ok"] is False and report["check"] == "metrics"
    assert any("QE_METRICS_PORT" in line for line in report["errors"])
    # Other commands that print the URL redact it too.
    unreachable = run([str(VENV_BIN / "qe"), "streams"], QE_REDIS_URL=url)
    assert unreachable.returncode == 1
    assert "cannot reach Redis at redis://qe-cli:***@127.0.0.1:1/0" in unreachable.stderr
    assert PASSWORD not in unreachable.stdout + unreachable.stderr


def test_daemon_logs_the_url_without_its_password(redis_url, tmp_path):
    """The good path still starts; the start-up log shows the URL redacted. (The private
    redis-server has no password: every command fails with an AUTH error, which the
    runtime logs and retries; the password must not be in any of it.)"""
    url = redis_url.replace("redis://", f"redis://default:{PASSWORD}@", 1)
    log_path = tmp_path / "session.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(SESSION, env=daemon_env(url), stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: '"msg":"starting"' in log_path.read_text(), timeout=30, message="qe-session never started")
        time.sleep(1.0)  # let it hit the AUTH failure at least once
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    output = log_path.read_text()
    assert '"redis_url":"redis://default:***@127.0.0.1:' in output
    assert PASSWORD not in output


# --- the rules, without a process ------------------------------------------------------------


def test_duplicate_keys_are_found_at_every_level():
    with pytest.raises(ValueError, match=r"duplicate key 'a.b' at line 3 \(first at line 2\)"):
        config.parse_yaml("a:\n  b: 1\n  b: 2\n")
    with pytest.raises(ValueError, match=r"duplicate key 'l.0.x' at line 3 \(first at line 2\)"):
        config.parse_yaml("l:\n- {x: 1,\n   x: 2}\n")
    # The same key spelled differently is still the same key.
    with pytest.raises(ValueError, match=r"duplicate key 'a' at line 2"):
        config.parse_yaml("a: 1\n'a': 2\n")
    assert config.parse_yaml("a: {b: 1}\nc: [1, 2]\n") == {"a": {"b": 1}, "c": [1, 2]}


def test_safety_sections_have_no_defaults():
    for section in (config.ExposureRules, config.ExecutionRules, config.DeriskRules, config.PlausibilityRules):
        with pytest.raises(ValidationError):
            section()
        assert all(field.is_required() for field in section.model_fields.values()), section.__name__
    required = {name for name, field in config.RiskRules.model_fields.items() if field.is_required()}
    assert {"streams", "exposure", "execution", "derisk", "plausibility"} <= required


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "rediss://user:pw@redis.example.com:6380/2",
        "redis://127.0.0.1:6379/0?socket_timeout=3",
        "unix:///var/run/redis/redis.sock?db=1",
    ],
)
def test_good_redis_urls_are_accepted(url):
    assert config.check_redis_url(url) == url


def test_settings_repr_hides_url_passwords():
    settings = config.load_settings({"QE_REDIS_URL": f"redis://u:{PASSWORD}@h:1/0", "QE_HAMMER_URL": f"ws://h:{PASSWORD}@h:1"})
    assert settings.redis_url.endswith(f"{PASSWORD}@h:1/0")  # the client still gets the real one
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    assert settings.redis_url_redacted == "redis://u:***@h:1/0"


def test_redaction():
    assert config.redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert config.redact_url("redis://:pw@h:1/0?password=x&db=1") == "redis://:***@h:1/0?password=***&db=1"
    assert config.redact_url("redis://h:1/0") == "redis://h:1/0"
    assert config.redact("got 'redis://u:p@ss@h:1/0' and ws://a:b@c") == "got 'redis://u:***@h:1/0' and ws://a:***@c"
    assert config.redact(config.redact("redis://u:p@h/0?password=x y")) == "redis://u:***@h/0?password=*** y"


def test_bounded_output():
    text = "\n".join(f"line {i}" for i in range(1000))
    cut = config.bounded(text)
    assert cut.splitlines()[-1] == "... 950 more lines"
    assert len(cut.splitlines()) == 51
    wide = config.bounded("\n".join("x" * 10_000 for _ in range(40)))
    assert len(wide.encode()) <= config.MAX_ERROR_BYTES + 50
    assert all(len(line) <= config.MAX_LINE_CHARS for line in wide.splitlines())
