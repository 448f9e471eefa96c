"""Prometheus and Grafana: the scrape config and alert rules pass promtool (and the
rules' own unit tests), the dashboard is structurally valid and every expression in
it is valid PromQL over metrics that exist, and the metrics the daemons really serve
pass `promtool check metrics`."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess
import sys
import urllib.request

import yaml

import daemons
from qe import metrics
from sim import metrics as sim_metrics
from sim.testing import start_process
from tests.support.processes import REPO, DaemonProcess, console_script, daemon_env, wait_until
from tests.support.system_tools import require_tool

PROMETHEUS_DIR = REPO / "etc" / "prometheus"
DASHBOARD = REPO / "etc" / "grafana" / "quant-engine.json"
METRIC_NAME = re.compile(r"\b(qe_[a-z0-9_]+)")


def promtool() -> str:
    return require_tool("promtool", "prometheus", "--no-install-recommends")


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=PROMETHEUS_DIR)


def every_daemon_metric() -> list:
    """Every metric any daemon owns (importing the daemons declares their own)."""
    for module in pkgutil.walk_packages(daemons.__path__, daemons.__name__ + "."):
        if not module.name.endswith(".__main__"):  # importing __main__ would run the daemon
            importlib.import_module(module.name)
    return metrics.all_collectors()


def known_series_names() -> set[str]:
    """Every series name a daemon can expose (counters with _total, histograms
    with _bucket/_sum/_count), whether or not a label set has been used yet. No
    `_created` series: they are disabled."""
    names = set()
    for collector in every_daemon_metric():
        for family in collector.describe():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
            else:
                names.add(family.name)
    return names


def simulator_series_names() -> set[str]:
    """What the simulator's endpoint (sim/metrics.py) serves, the demo's `ib-sim` target."""
    numbers = {key: 0 for key in ("orders", "orders_rejected", "open_orders", "fills", "filled_shares",
                                  "connected_clients", "accepting", "potential_gross_ratio", "potential_gross_max_ratio")}
    families = sim_metrics.families({**numbers, "faults_injected": {}, "faults_fired": {}})
    return {sample.name for family in families for sample in family.samples}


# --- prometheus.yml and alerts.yml ------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_its_rule_file():
    result = run_promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_accepts_the_rules():
    result = run_promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_fire_as_intended():
    """alerts_test.yml feeds series to every alert and states what must (not) fire."""
    result = run_promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts_test.yml").read_text()))
    defined = {rule["alert"] for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
               for rule in group["rules"]}
    assert tested == defined


def test_the_rule_tests_can_fail(tmp_path):
    broken = (PROMETHEUS_DIR / "alerts.yml").read_text().replace("qe_exposure_potential_gross_ratio > 1.30",
                                                                  "qe_exposure_potential_gross_ratio > 1.50")
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROMETHEUS_DIR / "alerts_test.yml", tmp_path)
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "QeHardCapPotential" in result.stdout + result.stderr


def test_every_daemon_is_scraped_on_its_default_port():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host == "127.0.0.1"
                scraped[static["labels"]["daemon"]] = (job["job_name"], int(port))
    assert {daemon: port for daemon, (_job, port) in scraped.items()} == metrics.DEFAULT_PORTS
    assert scraped["ib-sim"][0] == "quant-engine-demo"  # demo only: not in the "daemon down" alert
    assert {job for job, _port in scraped.values()} == {"quant-engine", "quant-engine-demo"}


def test_rules_use_metrics_that_exist():
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    exprs = [rule["expr"] for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]
    referenced = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    unknown = referenced - known_series_names()
    assert unknown == set(), unknown
    assert {"qe_heartbeat_timestamp_seconds", "qe_consumer_lag_entries", "qe_events_dead_lettered_total",
            "qe_broker_connected", "qe_exposure_potential_gross_ratio", "qe_exposure_gross_ratio",
            "qe_decision_mode", "qe_feed_stale"} <= referenced


# --- the Grafana dashboard ---------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(board: dict) -> list[dict]:
    return [target for panel in board["panels"] for target in panel.get("targets", [])]


def test_dashboard_structure():
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid) and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"])


def test_dashboard_covers_what_the_desk_watches():
    exprs = " ".join(t["expr"] for t in targets(dashboard()))
    for needed in ("qe_exposure_gross_ratio", "qe_exposure_potential_gross_ratio", "qe_exposure_bucket_ratio",
                   "qe_decision_mode", "qe_orders", "rate(qe_events_consumed_total[1m])", "qe_consumer_lag_entries",
                   "qe_broker_connected", "qe_events_dead_lettered_total"):
        assert needed in exprs, needed
    cap_panel = next(p for p in dashboard()["panels"] if p["title"].startswith("Gross and potential"))
    steps = cap_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 1.23, 1.30]  # CAP_RECOVERY target and hard cap lines


def test_dashboard_expressions_use_metrics_that_exist():
    referenced = {name for t in targets(dashboard()) for name in METRIC_NAME.findall(t["expr"])}
    known = known_series_names() | simulator_series_names()
    assert referenced and not referenced - known, referenced - known
    assert "qe_sim_referee_potential_gross_ratio" in referenced  # the demo's simulator has its panel


def test_dashboard_expressions_are_valid_promql(tmp_path):
    """Each expression as a recording rule: promtool parses every one."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": t["expr"]} for i, t in enumerate(targets(dashboard()))]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "rate(qe_orders[1m]"}]}]}))
    assert run_promtool("check", "rules", str(path)).returncode != 0  # the check can fail


# --- the metrics the daemons serve -------------------------------------------------------------

EXPOSE_EVERYTHING = r"""
import importlib, pkgutil, sys, time
import daemons, qe
from prometheus_client import start_http_server
from qe import metrics
for package in (qe, daemons):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith(".__main__"):  # importing __main__ would run the daemon
            importlib.import_module(module.name)
from prometheus_client import CollectorRegistry
everything = CollectorRegistry()
# Give every labelled metric one child so its samples are linted too.
for collector in metrics.all_collectors():
    everything.register(collector)
    if getattr(collector, "_labelnames", ()):
        collector.labels(*["x"] * len(collector._labelnames))
server, _thread = start_http_server(0, addr="127.0.0.1", registry=everything)
print(server.server_address[1], flush=True)
time.sleep(60)
"""


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return run_promtool("check", "metrics", stdin=text)


def test_every_metric_in_the_registry_passes_promtool():
    process = subprocess.Popen([sys.executable, "-c", EXPOSE_EVERYTHING], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        port = int(process.stdout.readline())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert "qe_alerts_emitted_total" in text and "qe_session_seconds_to_close" in text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE qe_")}
    assert len(families) >= 30
    result = check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_running_daemons_endpoint_passes_promtool(redis_url, r, tmp_path):
    daemon = DaemonProcess(console_script("qe-session"), daemon_env(redis_url), tmp_path / "session.log").start()
    try:
        url = wait_until(
            lambda: next((line["metrics_url"] for line in daemon.log_lines() if line.get("msg") == "metrics endpoint up"), None),
            timeout=30, message="metrics endpoint up",
        )
        wait_until(lambda: r.xlen("ev.session") > 0, timeout=30, message="a session event")
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    assert "qe_session_market_open" in text and "qe_heartbeat_timestamp_seconds" in text
    result = check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_metrics_can_fail():
    result = check_metrics("# HELP qe_bad_minutes x\n# TYPE qe_bad_minutes gauge\nqe_bad_minutes 1\n")
    assert result.returncode != 0 and "seconds" in result.stdout + result.stderr


def test_the_simulators_endpoint_passes_promtool():
    sim = start_process(["--account-file", "none", "--quote-rate", "0", "--print-rate", "0"])
    try:
        assert sim.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{sim.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        assert sim.stop() == 0
    assert {"qe_sim_orders_total", "qe_sim_fills_total", "qe_sim_connected_clients",
            "qe_sim_referee_potential_gross_ratio"} <= {line.split("{")[0].split()[0] for line in text.splitlines()
                                                        if line and not line.startswith("#")}
    assert 'qe_sim_faults_injected_total{fault="reject_next"} 0.0' in text  # every fault at 0 from the start
    result = check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr


# --- each daemon's own registry ----------------------------------------------------------------


def exported_by(daemon: str) -> set[str]:
    every_daemon_metric()
    return {family.name for family in metrics.registry_for(daemon).collect()}


def test_a_daemon_exports_only_the_metrics_it_owns():
    assert {d for d in metrics.DEFAULT_PORTS if "qe_broker_connected" in exported_by(d)} == {"execution", "decision"}
    assert {d for d in metrics.DEFAULT_PORTS if "qe_exposure_gross_ratio" in exported_by(d)} == {"exposure"}
    assert {d for d in metrics.DEFAULT_PORTS if "qe_l1_implausible" in exported_by(d)} == {"market-data"}
    assert {d for d in metrics.DEFAULT_PORTS if "qe_prints_excluded" in exported_by(d)} == {"prints"}
    assert "qe_events_consumed" not in exported_by("market-data")  # it consumes nothing
    assert "qe_events_published" in exported_by("market-data")
    every_metric = {family.name for collector in metrics.all_collectors() for family in collector.describe()}
    owned_by_someone = set().union(*(exported_by(d) for d in metrics.DEFAULT_PORTS if d != "ib-sim"))
    assert owned_by_someone == every_metric  # no metric without an owner


def test_unknown_values_start_as_nan_and_no_created_series():
    script = ("from prometheus_client import generate_latest; from qe import metrics; "
              "print(generate_latest(metrics.registry_for('exposure')).decode())")
    text = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                          cwd=REPO).stdout
    assert "qe_exposure_gross_ratio NaN" in text and "qe_exposure_potential_gross_ratio NaN" in text
    assert "qe_redis_up NaN" in text
    assert "_created" not in text
