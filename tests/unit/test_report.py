import io
import json

from flambe_iac.report import CHANGED, FAILED, UNCHANGED, DeployReport, HostReport, ProgressView, summary


def sample_report():
    hosts = [HostReport("i-1", "orchestrator", "10.0.0.1"), HostReport("i-2", "factory", "10.0.0.2")]
    report = DeployReport("c1", hosts, cluster_key_fingerprint="SHA256:abc", cluster_key_action="kept")
    for step in hosts[0].steps.values():
        step.status = UNCHANGED
    hosts[1].steps["cluster key"].status = CHANGED
    hosts[1].steps["secrets"].status = FAILED
    hosts[1].error = "secrets failed: disk full"
    return report


def test_plain_view_prints_a_line_per_finished_step():
    report = sample_report()
    stream = io.StringIO()
    view = ProgressView(report, stream, live=False)
    view.step_done(report.hosts[1], "secrets")
    assert stream.getvalue() == "i-2 (10.0.0.2): secrets FAILED (0.00 s): secrets failed: disk full\n"


def test_live_view_redraws_one_table_in_place():
    report = sample_report()
    stream = io.StringIO()
    view = ProgressView(report, stream, live=True)
    view.step_done(report.hosts[0], "secrets")
    view.step_done(report.hosts[1], "secrets")
    text = stream.getvalue()
    assert text.count("\x1b[4F\x1b[J") == 1  # the second drawing moved back over the first (header, 2 hosts, time)
    assert "FAILED" in text and "unchanged" in text


def test_report_json_and_summary_say_which_host_failed_and_why():
    report = sample_report()
    document = json.loads(report.to_json())
    assert document["ok"] is False
    assert document["hosts"][1]["error"] == "secrets failed: disk full"
    text = summary(report)
    assert "1 of 2 hosts done" in text
    assert "FAILED: secrets failed: disk full" in text
    assert "SHA256:abc (kept)" in text
