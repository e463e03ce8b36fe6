"""The shipped dashboard and alert rules, proven against a real Prometheus.

A real faceverify server (metrics on a free port) gets a little traffic of
every kind; a real Prometheus (Debian's package; ``.ci/run`` installs it)
scrapes it every second and evaluates ``monitoring/prometheus/alerts.yml``.
Then: ``promtool`` accepts the rules and the configuration, every rule
evaluates without error, every recording rule and every series an alert
reads has data, and every PromQL expression of the Grafana dashboard returns
data.  Outside CI the test is skipped when Prometheus is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.serverproc import free_port
from server.tools.client import CallError, FaceVerifyClient
from tests.conftest import ServerThread, lfw_image, server_settings, unavailable
from tests.imaging import blank

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "alerts.yml"
CONFIG = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "faceverify.json"
SCRAPE_S = 1


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = (f"{name} is not installed (Debian package `prometheus`; .ci/run installs it)")
        unavailable(message)
    return path


def promtool(*args: str) -> None:
    out = subprocess.run([tool("promtool"), *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        return list(self.get("/api/v1/query", query=expr)["result"])

    def wait_for(self, expr: str, timeout: float = 60) -> None:
        """Poll until ``expr`` has data (Prometheus works on its own clock)."""
        deadline = time.monotonic() + timeout
        while not self.query(expr):
            assert time.monotonic() < deadline, f"no data for {expr} after {timeout} s"
            time.sleep(SCRAPE_S / 2)


@pytest.fixture(scope="module")
def metered(calibrated_dlib_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerThread]:
    settings = server_settings(calibrated_dlib_model_dir, tmp_path_factory.mktemp("data"),
                               metrics_port=0)
    with ServerThread(settings) as s:
        yield s


@pytest.fixture(scope="module")
def prometheus(metered: ServerThread, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    assert metered.running is not None and metered.running.metrics_server is not None
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s",
                        "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{metered.running.metrics_server.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", str(work / "prometheus.yml"))
    port = free_port()
    with open(work / "log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, (work / "log").read_text()
                assert time.monotonic() < deadline, "Prometheus did not become ready"
                time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def traffic(target: str, lfw: Path, round_: int) -> None:
    """One of each: matches, a refused image, an enrolment and its duplicate (flagged,
    then reviewed), look-ups."""
    person = ["Abel_Pacheco", "Anthony_Fauci"][round_ - 1]
    a, b = lfw_image(lfw, person, 1), lfw_image(lfw, person, 2)
    first, second = f"317401150590{2 * round_ - 1:04d}", f"317401150590{2 * round_:04d}"
    with FaceVerifyClient(target) as client:
        for _ in range(3):
            client.verify(a, b)
        with pytest.raises(CallError):
            client.verify(blank(), b)
        assert client.enroll(first, a).enrolled
        dup = client.enroll(second, b)
        assert dup.outcome == dup.ENROLLED_FLAGGED
        assert client.list_reviews().pending_total == 1
        client.resolve_review(second, confirm=True, reviewer="test")
        client.search(a)
        client.get_enrollment(first)


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, metered: ServerThread, lfw_dir: Path) -> Prometheus:
    """Two rounds of traffic with scrapes between, so that every counter, even one
    first created by the traffic, has two different samples for its rate."""
    prometheus.wait_for('count_over_time(up{job="faceverify"}[1m]) >= 2')
    traffic(metered.target, lfw_dir, 1)
    prometheus.wait_for('faceverify_requests_total{method="GetEnrollment"}')
    traffic(metered.target, lfw_dir, 2)
    prometheus.wait_for('increase(faceverify_requests_total{method="GetEnrollment"}[1m]) > 0')
    # Let every rule group evaluate over the new data.
    time.sleep(3 * SCRAPE_S)
    return prometheus


def substitute(expr: str) -> str:
    """Grafana's variables as a query on the API sees them."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
            .replace("$instance", ".*"))


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_accepts_the_rules() -> None:
    promtool("check", "rules", str(RULES))


def test_every_rule_evaluates_without_error(scraped: Prometheus) -> None:
    groups = scraped.get("/api/v1/rules")["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    names = {r.get("record") or r["alert"] for r in rules()}
    assert names <= set(evaluated)
    for name in names:
        assert evaluated[name]["health"] == "ok", (name, evaluated[name].get("lastError"))


def test_every_recording_rule_has_data(scraped: Prometheus) -> None:
    for rule in rules():
        if "record" in rule:
            assert scraped.query(rule["record"]), rule["record"]


SERIES = re.compile(r"(?<![\w\"])(faceverify[_:][\w:]*|up)(?=[\s{\[)]|$)")


def test_every_series_an_alert_reads_has_data(scraped: Prometheus) -> None:
    for rule in rules():
        if "alert" not in rule:
            continue
        names = set(SERIES.findall(rule["expr"]))
        assert names, rule["alert"]
        for name in names:
            selector = f'{name}{{job="faceverify"}}' if name == "up" else name
            assert scraped.query(selector), (rule["alert"], name)
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("page", "ticket")


def test_every_dashboard_query_returns_data(scraped: Prometheus) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    empty = [e for e in exprs if not scraped.query(substitute(e))]
    assert not empty, empty


def test_alerts_are_quiet_on_a_healthy_server(scraped: Prometheus) -> None:
    firing = [a for a in scraped.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing
