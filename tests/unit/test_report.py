import io
import json

from flambe_iac.engine.report import (
    CHANGED,
    FAILED,
    PENDING,
    SKIPPED,
    UNCHANGED,
    DeployReport,
    HostReport,
    ProgressView,
    summary,
)

STEPS = ("cluster key", "secrets", "resources", "manifest")


def host(host_id, role, address):
    entry = HostReport(host_id, role, address, {})
    from flambe_iac.engine.report import StepResult

    entry.steps = {name: StepResult() for name in STEPS}
    for name in ("cluster key", "secrets", "manifest"):
        entry.ask(name)
    return entry


def sample_report():
    hosts = [host("i-1", "orchestrator", "10.0.0.1"), host("i-2", "factory", "10.0.0.2")]
    report = DeployReport("c1", hosts, cluster_key_fingerprint="SHA256:abc", cluster_key_action="kept")
    for name in ("cluster key", "secrets", "manifest"):
        hosts[0].finish(name, UNCHANGED)
    hosts[1].finish("cluster key", CHANGED)
    hosts[1].finish("secrets", FAILED, "disk full")
    hosts[1].fail("secrets failed")
    return report


def test_plain_view_prints_a_line_per_finished_step_with_its_cause():
    report = sample_report()
    stream = io.StringIO()
    view = ProgressView(report, stream, live=False)
    view.step_done(report.hosts[1], "secrets")
    assert stream.getvalue() == "i-2 (10.0.0.2): secrets FAILED (0.00 s): disk full\n"


def test_live_view_redraws_one_table_in_place_with_only_the_asked_columns():
    report = sample_report()
    stream = io.StringIO()
    view = ProgressView(report, stream, live=True)
    view.step_done(report.hosts[0], "secrets")
    view.step_done(report.hosts[1], "secrets")
    text = stream.getvalue()
    assert text.count("\x1b[4F\x1b[J") == 1  # the second drawing moved back over the first (header, 2 hosts, time)
    assert "FAILED" in text and "unchanged" in text
    assert "resources" not in text  # asked of no host: no column


def test_report_json_and_summary_say_which_host_failed_and_why():
    report = sample_report()
    document = json.loads(report.to_json())
    assert document["ok"] is False
    assert document["hosts"][1]["error"] == "secrets: disk full"
    assert document["hosts"][1]["steps"]["manifest"] == {"status": FAILED, "seconds": 0.0,
                                                         "cause": "not done: secrets failed", "detail": None}
    text = summary(report)
    assert "1 of 2 hosts done" in text
    assert "FAILED: secrets: disk full" in text
    assert "SHA256:abc (kept)" in text


def test_a_step_still_pending_at_the_end_is_failed_never_skipped_or_done():
    report = sample_report()
    report.hosts[0].ask("resources")
    assert not report.hosts[0].ok  # pending is not done
    report.close()
    assert report.hosts[0].steps["resources"].status == FAILED
    assert report.hosts[0].steps["resources"].cause == "not done: the run ended before it"
    assert report.hosts[1].steps["resources"].status == SKIPPED  # never asked of it
    assert not report.ok


def test_an_interrupted_run_is_never_ok_even_when_every_step_finished():
    report = sample_report()
    report.hosts[1] = host("i-2", "factory", "10.0.0.2")
    for name in ("cluster key", "secrets", "manifest"):
        report.hosts[1].finish(name, CHANGED)
    assert report.ok
    report.interrupted = "SIGTERM"
    assert not report.ok and "INTERRUPTED by SIGTERM" in summary(report)
    assert json.loads(report.to_json())["ok"] is False
    assert PENDING not in {step.status for entry in report.hosts for step in entry.steps.values()}
