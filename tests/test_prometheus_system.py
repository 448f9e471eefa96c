"""Metrics, alerts and the dashboard against the running system.

One simulated afternoon (tests/support/system.py: the IB simulator and every daemon,
alerts included, on a sped-up clock) serves every test here:

- each daemon exports only its own metrics, created where they must exist from the
  start, and no `_created` series;
- every alert rule fires on the first occurrence of its condition, tested with
  promtool from the REAL initial state of the series (each endpoint scraped the
  moment it answers);
- a real Prometheus (Debian's package) scrapes the system: every target up, every
  Grafana panel's queries return data, and the daemon-down, halted and dead-letter
  alerts go firing when provoked (the last test: it kills a daemon).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from qe import metrics
from tests.support.processes import REPO, wait_until
from tests.support.system import DAEMONS, System, new_york
from tests.support.system_tools import require_tool
from tests.support.raw_streams import append
from tests.test_prometheus_config import every_daemon_metric

pytestmark = pytest.mark.slow

PROMETHEUS_DIR = REPO / "etc" / "prometheus"
DASHBOARD = REPO / "etc" / "grafana" / "quant-engine.json"
EVERY_DAEMON = (*DAEMONS, "alerts", "pnl")
DAY = "2026-11-20"


# --- the running system and what its endpoints said first ----------------------------------------


@dataclass
class Scrape:
    daemon: str
    wall_s: float
    text: str

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(self.text)
                for s in family.samples]

    def names(self) -> set[str]:
        """Series names present (with at least one sample)."""
        return {name for name, _labels, _value in self.samples()}

    def families(self) -> set[str]:
        """Metric families served (a labelled one may have no series yet)."""
        return {family.name for family in text_string_to_metric_families(self.text)}


@dataclass
class Running:
    system: System
    urls: dict[str, str]  # daemon (and "ib-sim") -> metrics URL
    first: dict[str, Scrape] = field(default_factory=dict)  # the scrape the moment each endpoint answered


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def scrape_each_as_soon_as_it_answers(system: System) -> tuple[dict[str, str], dict[str, Scrape]]:
    urls: dict[str, str] = {}
    first: dict[str, Scrape] = {}

    def all_scraped() -> bool:
        for name in set(EVERY_DAEMON) - set(first):
            process = system.daemons[name]
            assert process.alive(), f"{name} died:\n{process.output()[-3000:]}"
            url = next((line["metrics_url"] for line in process.log_lines() if line.get("msg") == "metrics endpoint up"), None)
            if url is not None:
                urls[name] = url
                first[name] = Scrape(name, time.time(), scrape(url))
        return len(first) == len(EVERY_DAEMON)

    wait_until(all_scraped, timeout=60, interval=0.02, message="every metrics endpoint")
    return urls, first


@pytest.fixture(scope="module")
def running(tmp_path_factory) -> Running:
    system = System(tmp_path_factory.mktemp("system"), new_york(DAY, "15:30"), daemons=EVERY_DAEMON)
    try:
        urls, first = scrape_each_as_soon_as_it_answers(system)
        assert system.sim.metrics_port, "the simulator serves no metrics"
        urls["ib-sim"] = f"http://127.0.0.1:{system.sim.metrics_port}/metrics"
        yield Running(system, urls, first)
    finally:
        system.stop()


# --- 1. each daemon exports only its own metrics --------------------------------------------------


def test_each_daemon_exports_only_its_own_metrics(running):
    every_daemon_metric()  # import every daemon: their own metrics are declared in their modules
    names = {daemon: scrape.families() for daemon, scrape in running.first.items()}
    assert {d for d, n in names.items() if "qe_broker_connected" in n} == {"execution", "decision"}
    assert {d for d, n in names.items() if "qe_exposure_gross_ratio" in n} == {"exposure"}
    assert {d for d, n in names.items() if "qe_orders" in n} == {"execution"}
    assert {d for d, n in names.items() if "qe_feed_stale" in n} == {"market-data"}
    assert {d for d, n in names.items() if "qe_alerts_active" in n or "qe_exposure_bucket_ratio" in n} <= {"alerts"}
    assert all("qe_heartbeat_timestamp_seconds" in scraped.names() for scraped in running.first.values())
    for daemon, scraped in running.first.items():
        assert not [n for n in scraped.names() if n.endswith("_created")], daemon
        owned = {family.name for metric in metrics.collectors_of(daemon) for family in metric.describe()}
        assert scraped.families() <= owned, (daemon, scraped.families() - owned)


def test_series_an_alert_needs_exist_at_zero_before_the_first_event(running):
    """Dead letters per consumed stream and reason, and consumed/published per stream,
    at 0 in the very first scrape (before the first entry could be handled)."""
    dead = {(labels["stream"], labels["reason"]): value for scraped in [running.first["execution"]]
            for name, labels, value in scraped.samples() if name == "qe_events_dead_lettered_total"}
    assert {stream for stream, _reason in dead} >= {"ev.intents", "ev.control", "ev.l1", "ev.session"}
    assert {reason for _stream, reason in dead} == set(metrics.DEAD_LETTER_REASONS)
    assert set(dead.values()) == {0.0}
    for daemon in ("prints", "exposure", "alerts", "decision"):
        streams = {labels["stream"] for name, labels, _v in running.first[daemon].samples()
                   if name == "qe_events_dead_lettered_total"}
        assert streams, daemon


def test_the_simulator_serves_the_referee(running):
    control = running.system.sim.control
    wait_until(lambda: control.fills(), timeout=90, interval=1.0, message="a fill at the simulator")
    samples = {(name, tuple(sorted(labels.items()))): value
               for name, labels, value in Scrape("ib-sim", time.time(), scrape(running.urls["ib-sim"])).samples()}
    assert samples[("qe_sim_fills_total", ())] >= 1
    assert samples[("qe_sim_orders_total", ())] >= 1
    assert samples[("qe_sim_connected_clients", ())] >= 2  # market data and execution
    assert 1.0 < samples[("qe_sim_referee_potential_gross_max_ratio", ())] < 1.5  # the seeded ~125 % account
    assert samples[("qe_sim_faults_injected_total", (("fault", "reject_next"),))] == 0


# --- 3. every alert fires on the first occurrence, from the real initial state ----------------------


@dataclass(frozen=True)
class Occurrence:
    """The first occurrence of an alert's condition, applied to the real initial series."""

    alert: str
    daemon: str  # whose first scrape holds the series
    metric: str
    match: dict  # labels selecting the series (also its labels if the scrape had none)
    value: float | str  # the value from the change on; "+1": one more than at the start; "hold": unchanged
    condition_after_s: int = 15  # when the condition becomes true (the change is at 15 s)
    keep: tuple[str, ...] | None = None  # the labels the rule keeps (sum by ...), None: all


OCCURRENCES = (
    Occurrence("QeDaemonDown", "decision", "up", {}, 0),
    # The loop never turns after the start: the heartbeat stays at its initial value.
    Occurrence("QeDaemonStalled", "exposure", "qe_heartbeat_timestamp_seconds", {}, "hold", condition_after_s=75),
    Occurrence("QeRedisUnreachable", "prints", "qe_redis_up", {}, 0),
    Occurrence("QeConsumerLag", "execution", "qe_consumer_lag_entries", {"stream": "ev.intents", "group": "execution_service"}, 1500),
    Occurrence("QeDeadLetters", "execution", "qe_events_dead_lettered_total", {"stream": "ev.intents", "reason": "invalid"},
               "+1", keep=("daemon", "stream", "reason")),
    Occurrence("QeBrokerDown", "execution", "qe_broker_connected", {}, 0),
    Occurrence("QeHardCapPotential", "exposure", "qe_exposure_potential_gross_ratio", {}, 1.31),
    Occurrence("QeHardCapCurrent", "exposure", "qe_exposure_gross_ratio", {}, 1.30),
    Occurrence("QeModeHalted", "decision", "qe_decision_mode", {"mode": "HALTED"}, 1),
    Occurrence("QeFeedStale", "market-data", "qe_feed_stale", {"source": "ib"}, 1),
)
STEP_S = 15  # the shipped scrape and evaluation interval


def shipped_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def duration_s(text: str | None) -> int:
    if not text:
        return 0
    units = {"s": 1, "m": 60, "h": 3600}
    return int(text[:-1]) * units[text[-1]]


def promtool_number(value: float) -> str:
    return "NaN" if value != value else repr(float(value))


def initial_value(occurrence: Occurrence, first: Scrape) -> tuple[dict[str, str], float | None]:
    """The series' labels (as Prometheus stores them) and its value in the first scrape (None: absent)."""
    target = {"job": "quant-engine", "daemon": first.daemon, "instance": f"127.0.0.1:{metrics.DEFAULT_PORTS[first.daemon]}"}
    if occurrence.metric == "up":
        return target, 1.0  # the scrape succeeded
    for name, labels, value in first.samples():
        if name == occurrence.metric and occurrence.match.items() <= labels.items():
            if name.endswith("_timestamp_seconds"):
                value -= first.wall_s  # promtool's clock starts at 0: the scrape's moment
            return {**labels, **target}, value
    return {**occurrence.match, **target}, None


def rule_test(occurrence: Occurrence, first: Scrape, rule: dict) -> dict:
    labels, start = initial_value(occurrence, first)
    fires_by = occurrence.condition_after_s + duration_s(rule.get("for")) + STEP_S
    steps = fires_by // STEP_S + 1
    if occurrence.value == "hold":
        later = start
    elif occurrence.value == "+1":
        later = (start or 0.0) + 1
    else:
        later = float(occurrence.value)
    initial = "_" if start is None else promtool_number(start)
    values = " ".join([initial] + [promtool_number(later)] * steps)  # type: ignore[arg-type]
    selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    expected = {k: v for k, v in labels.items() if occurrence.keep is None or k in occurrence.keep}
    return {
        "interval": f"{STEP_S}s",
        "input_series": [{"series": f"{occurrence.metric}{{{selector}}}", "values": values}],
        "alert_rule_test": [
            {"eval_time": "0s", "alertname": occurrence.alert, "exp_alerts": []},  # the initial state is quiet
            {"eval_time": f"{fires_by}s", "alertname": occurrence.alert,
             "exp_alerts": [{"exp_labels": {**expected, **rule["labels"]}}]},
        ],
    }


def run_rule_tests(directory: Path, first: dict[str, Scrape]) -> subprocess.CompletedProcess[str]:
    """The shipped rules without annotations (alerts_test.yml checks those), tested from `first`."""
    document = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (directory / "alerts.yml").write_text(yaml.safe_dump(document))
    rules = {rule["alert"]: rule for rule in shipped_rules()}
    tests = [rule_test(o, first[o.daemon], rules[o.alert]) for o in OCCURRENCES]
    (directory / "initial_state_test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["alerts.yml"], "evaluation_interval": f"{STEP_S}s", "tests": tests}, sort_keys=False))
    promtool = require_tool("promtool", "prometheus", "--no-install-recommends")
    return subprocess.run([promtool, "test", "rules", "initial_state_test.yml"], capture_output=True, text=True,
                          timeout=120, cwd=directory)


def test_every_alert_fires_on_the_first_occurrence_from_the_real_initial_state(running, tmp_path):
    assert {o.alert for o in OCCURRENCES} == {rule["alert"] for rule in shipped_rules()}
    result = run_rule_tests(tmp_path, running.first)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_initial_state_test_catches_a_counter_born_at_its_first_increment(running, tmp_path):
    """Without the dead-letter series at 0 in the first scrape (the counter appearing only
    with its first increment), QeDeadLetters cannot fire: the generated test says so."""
    execution = running.first["execution"]
    without = "\n".join(line for line in execution.text.splitlines()
                        if not line.startswith("qe_events_dead_lettered_total{"))
    first = {**running.first, "execution": Scrape("execution", execution.wall_s, without + "\n")}
    result = run_rule_tests(tmp_path, first)
    assert result.returncode != 0
    assert "QeDeadLetters" in result.stdout + result.stderr
    failed = {line.split("alertname: ")[1].split(",")[0] for line in (result.stdout + result.stderr).splitlines()
              if "alertname: " in line}
    assert failed == {"QeDeadLetters"}, result.stdout + result.stderr


# --- 4. a real Prometheus scraping the running system ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus_config(directory: Path, urls: dict[str, str]) -> Path:
    """The shipped prometheus.yml with the test's ports, a 1 s scrape and evaluation,
    and the shipped rules with every `for:` at 2 s."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="900ms", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            daemon = static["labels"]["daemon"]
            static["targets"] = [urllib.parse.urlsplit(urls[daemon]).netloc]
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    (directory / "alerts.yml").write_text(yaml.safe_dump(rules))
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, directory: Path, config: Path) -> None:
        binary = require_tool("prometheus", "prometheus", "--no-install-recommends")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address={urllib.parse.urlsplit(self.url).netloc}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, cwd=directory,
            )
        wait_until(self.ready, timeout=30, interval=0.2, message="prometheus ready")

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = json.loads(urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def targets(self) -> dict[str, str]:
        return {t["labels"]["daemon"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def has_data(result: list[dict]) -> bool:
    """At least one series with a number (not NaN)."""
    return any(item["value"][1] not in ("NaN", "+Inf", "-Inf") for item in result)


def firing(prometheus: Prometheus) -> list[dict]:
    return [a for a in prometheus.alerts() if a["state"] == "firing"]


def test_a_real_prometheus_scrapes_everything_the_panels_have_data_and_the_alerts_fire(running, tmp_path):
    system = running.system
    prometheus = Prometheus(tmp_path, prometheus_config(tmp_path, running.urls))
    try:
        expected_targets = {*EVERY_DAEMON, "ib-sim"}
        wait_until(lambda: prometheus.targets() == {name: "up" for name in expected_targets}, timeout=30,
                   interval=0.5, message="every target up")

        def empty_panels() -> list[tuple[str, str]]:
            return [(title, expr) for title, expr in panel_queries() if not has_data(prometheus.query(expr))]

        try:
            wait_until(lambda: not empty_panels(), timeout=90, interval=2.0, message="data in every panel")
        except AssertionError:
            raise AssertionError(f"panels without data: {empty_panels()}") from None

        provoked = {"QeDaemonDown", "QeModeHalted", "QeDeadLetters"}
        assert not {a["labels"]["alertname"] for a in prometheus.alerts()} & provoked  # quiet before
        append(system.r, "ev.intents", {"event": "{not an envelope"})  # dead-lettered by execution
        halted = system.qe("halt", "--reason", "prometheus test")
        assert halted.returncode == 0, halted.stdout + halted.stderr
        system.kill("prints")

        def fired() -> dict[str, dict]:
            return {a["labels"]["alertname"]: a["labels"] for a in firing(prometheus)
                    if a["labels"]["alertname"] in provoked}

        labels = wait_until(lambda: fired().keys() == provoked and fired(), timeout=60, interval=0.5,
                            message=f"{provoked} firing")
        assert labels["QeDaemonDown"]["daemon"] == "prints"
        assert labels["QeModeHalted"]["daemon"] == "decision"
        assert (labels["QeDeadLetters"]["daemon"], labels["QeDeadLetters"]["stream"],
                labels["QeDeadLetters"]["reason"]) == ("execution", "ev.intents", "invalid")
    finally:
        prometheus.stop()
