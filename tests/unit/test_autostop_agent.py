"""The autostop agent without hosts: its readings of /proc and nvidia-smi, its state record read as untrusted, the
crontab kept byte for byte, its decisions on a clock of the test's own, the metadata service's notice, and the
runner's call of on_preempt."""

import json
import os
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flambe_iac.agent import __main__ as agent_main
from flambe_iac.agent import commands as commands_module
from flambe_iac.agent import watch as watch_module
from flambe_iac.agent.commands import SHUTDOWN
from flambe_iac.agent.crontab import CrontabError, reboot_line, with_agent, without_agent
from flambe_iac.agent.records import AgentConfig, AgentState, parse_clock, parse_state, read_config
from flambe_iac.agent.signals import (
    PROBE_MARK,
    CpuTimes,
    Process,
    Thresholds,
    busy_cores,
    busy_signals,
    cpu_times,
    gpu_utilizations,
    is_ray_task,
    open_sessions,
    runnable_alive,
    session_owner,
)
from flambe_iac.agent.spot import NO_NOTICE, MetadataService, Notice, read_notice
from flambe_iac.agent.watch import Watch, sample_seconds
from flambe_iac.day_two.status import agent_status
from flambe_iac.lab.metadata_service import handler_for
from flambe_iac import runnable as runnable_module
from flambe_iac.runnable import Runnable, answer_notices, answer_preemptions

# Readings.

def test_gpu_utilizations_read_each_gpu_and_skip_what_is_not_a_number():
    assert gpu_utilizations("0\n87\n[N/A]\n 12 %\n101\nerror\n") == [0.0, 87.0, 12.0]
    assert gpu_utilizations("[N/A]\n[N/A]\n") == []  # MIG: what the agent counts as unreadable, so busy


def test_cpu_times_and_busy_cores():
    before = cpu_times("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    after = cpu_times("cpu  300 0 100 1000 0 0 0 0 0 0\n")
    assert before == CpuTimes(busy=200, total=1000) and after == CpuTimes(busy=400, total=1400)
    assert busy_cores(before, after, 4) == pytest.approx(2.0)  # half the time busy, on 4 cores
    assert busy_cores(after, before, 4) is None and cpu_times("cpu x y z") is None


@given(st.text())
def test_readings_never_crash_on_any_text(text):
    gpu_utilizations(text)
    cpu_times(text)
    session_owner(text)
    is_ray_task(text)


def test_sessions_of_the_user_count_but_an_agents_probe_does_not():
    found = [Process(10, 1, "sshd: ubuntu@pts/0"), Process(11, 10, "-bash"),
             Process(20, 1, "sshd-session: ubuntu@notty"), Process(21, 20, f"bash -c : {PROBE_MARK}; cat x; :"),
             Process(22, 21, "cat x"),
             Process(30, 1, "sshd: alice@notty"), Process(40, 1, "sshd: ubuntu [priv]"),
             Process(50, 1, "sshd: ubuntu@notty"),  # no command for an hour (a held connection): a session
             Process(60, 1, "sshd: ubuntu@notty", age=1.0)]  # a second old, nothing run yet: maybe a probe
    assert open_sessions(found, "ubuntu") == 2
    assert session_owner("sshd-session: ubuntu@notty") == "ubuntu" and session_owner("sshd: /usr/sbin/sshd") is None


def test_ray_tasks_and_actors_are_work_idle_workers_are_not():
    assert is_ray_task("ray::train_step()") and is_ray_task("ray::Trainer.fit")
    assert not is_ray_task("ray::IDLE") and not is_ray_task("python raylet") and not is_ray_task("gcs_server")


def test_the_runnable_is_alive_while_its_pid_lives_and_it_left_no_exit_code(tmp_path):
    home, proc = tmp_path / "home", tmp_path / "proc"
    (home / ".flambe").mkdir(parents=True)
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "stat").write_text("42 (sh) S 1 ...")
    (proc / "42" / "cmdline").write_bytes(b"sh\0-c\0python3 -m flambe_iac.runnable .flambe/run.json\0")
    assert not runnable_alive(home, proc)
    (home / ".flambe" / "run.pid").write_text("42\n")
    assert runnable_alive(home, proc)
    (proc / "42" / "cmdline").write_bytes(b"/usr/sbin/cron\0")  # after a reboot, the pid is another process's
    assert not runnable_alive(home, proc)
    (proc / "42" / "cmdline").write_bytes(b"sh\0-c\0python3 -m flambe_iac.runnable .flambe/run.json\0")
    (proc / "42" / "stat").write_text("42 (sh) Z 1 ...")
    assert not runnable_alive(home, proc)
    (proc / "42" / "stat").write_text("42 (a) b) S 1")
    (home / ".flambe" / "run.exit").write_text("0\n")
    assert not runnable_alive(home, proc)
    (home / ".flambe" / "run.pid").write_text("../1\n")
    assert not runnable_alive(home, proc)


def test_busy_signals_in_words(tmp_path):
    found = [Process(5, 1, "ray::train()"), Process(6, 1, "sshd: ubuntu@pts/1")]
    signals = busy_signals(Thresholds(gpu_percent=10, cpu_cores=0.5), "ubuntu", tmp_path, 1.5, [3.0, 55.0], found)
    assert signals == ["gpu 55%", "cpu 1.50 cores", "1 ssh session", "1 ray task"]
    assert busy_signals(Thresholds(), "ubuntu", tmp_path, 0.1, [9.0], []) == []
    assert busy_signals(Thresholds(), "ubuntu", tmp_path, None, None, []) == []
    assert busy_signals(Thresholds(), "ubuntu", tmp_path, None, "unreadable", []) == ["gpu unreadable"]


# The state record, as `status` and the orchestrator's agent read it.

def test_a_state_record_reads_back():
    record = AgentState(pid=7, role="factory", minutes=30, idle_minutes=4.5, last_busy="gpu 80%")
    assert parse_state(record.to_bytes()) == record


@pytest.mark.parametrize("data, cause", [
    (b"", "not a JSON object"),
    (b'{"pid": 7, "state": "watch', "not JSON (a full disk can leave it truncated)"),
    (b'{"pid": 7, "state": "sleeping"}', "names no known state"),
    (b'{"pid": 7, "state": "watching", "idle_minutes": NaN}', "idle_minutes is not a number"),
    (b'{"pid": 7, "state": "watching", "idle_minutes": true}', "idle_minutes is not a number"),
    (b'{"pid": 7, "state": "watching", "last_busy": ["x"]}', "wrong type"),
    (b'{"pid": 7, "state": "watching", "waiting_for": [1]}', "waiting_for is not a list of names"),
    (b"[" * 100000, "over 4096 bytes"),
    (b"[" * 4000, "not JSON"),
    (b'{"pid": 7, "state": "preempted", "preempted_at": 1e20}', "preempted_at is not a number"),
    (b'{"pid": 7, "state": "watching"}', "has no role"),
    (b'{"pid": 7, "state": "stopping", "role": "f", "minutes": 1, "idle_minutes": null, "updated_at": 1}',
     "has no idle_minutes"),
    (b'{"pid": 7, "state": "watching", "role": "f", "minutes": 1, "idle_minutes": 0, "updated_at": null}',
     "has no updated_at"),
    (b'{"pid": true, "state": "watching"}', "names no known state"),
])
def test_a_bad_state_record_is_a_cause_in_words(data, cause):
    assert cause in parse_state(data)


RECORD_KEYS = st.sampled_from(sorted(AgentState.__dataclass_fields__))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3), max_leaves=5)


@given(st.dictionaries(RECORD_KEYS, JSON_VALUES), st.sampled_from(["watching", "stopping", "preempted",
                                                                   "stop refused"]),
       st.text(max_size=4))
def test_a_record_that_parses_can_be_shown_and_judged(fields, state, clock):
    """What parses must be usable: `status` words it and the orchestrator judges it, never a TypeError."""
    record = parse_state(json.dumps({"pid": 7, "state": state, **fields}).encode())
    if isinstance(record, AgentState):
        words, _ = agent_status([clock, record.to_bytes().decode().strip(), "@alive"], [])
        assert words


@pytest.mark.parametrize("line, clock", [("1700000000", 1700000000.0), (" 17\n", 17.0), ("\u00b2", None),
                                         ("-5", None), ("", None), ("1e9", None)])
def test_a_hosts_clock_is_ascii_digits_or_unknown(line, clock):
    assert parse_clock(line) == clock


@given(st.binary(max_size=600))
def test_any_bytes_are_a_record_or_a_cause(data):
    assert isinstance(parse_state(data), (AgentState, str))


def test_settings_that_are_wrong_are_refused():
    config = AgentConfig(minutes=5, role="factory", member_id="i-1", user="ubuntu", factories=("10.0.0.2",))
    assert read_config(config.to_bytes()) == config
    base = '"role": "f", "member_id": "i", "user": "u"'
    for data in (b"[]", b'{"minutes": 0, ' + base.encode() + b"}", b'{"surprise": 1}',
                 b'{"minutes": 5, "gpu_percent": "10", ' + base.encode() + b"}",
                 b'{"minutes": 5, "factories": "10.0.0.1", ' + base.encode() + b"}"):
        with pytest.raises((ValueError, TypeError)):
            read_config(data)


# The crontab.

LINE = reboot_line("/usr/bin/python3", "/usr/local/bin:/usr/bin:/bin")
user_lines = st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)))
                      | st.just("@reboot echo mine # flambe-autostop") | st.just("@reboot cd && PATH=/x mine")
                      | st.just(LINE.replace(" 2>&1 ", " 2>&1; /opt/notify.sh ")) | st.just(LINE + " # mine too")
                      | st.just(f"0 * * * * echo a\r{LINE}"), max_size=8)


@given(user_lines)
def test_the_users_crontab_is_kept_byte_for_byte(lines):
    table = "".join(f"{line}\n" for line in lines).encode()
    added = with_agent(table, LINE)
    assert added.startswith(table) and added.endswith(LINE.encode() + b"\n")
    assert with_agent(added, LINE) == added  # once, however many deploys
    assert without_agent(added) == table


def test_a_table_without_a_final_newline_gets_one_before_our_line():
    assert with_agent(b"@daily true", LINE) == b"@daily true\n" + LINE.encode() + b"\n"


def test_a_line_like_ours_ending_in_crlf_is_the_users_as_cron_reads_it():
    """Cron runs `...# flambe-autostop\r` with its \r: not the line we wrote, so a user's line, kept."""
    table = b"a\n" + LINE.encode() + b"\r\n"
    assert without_agent(table) == table
    assert with_agent(table, LINE) == table + LINE.encode() + b"\n"
    assert without_agent(with_agent(table, LINE)) == table


def test_a_lone_carriage_return_is_inside_a_line_as_cron_reads_it():
    """Cron ends lines at \n only: the user's job `echo a\r...` must not be cut into a line of ours."""
    table = b"0 * * * * echo a\r" + LINE.encode() + b"\n"
    assert without_agent(table) == table
    assert with_agent(table, LINE) == table + LINE.encode() + b"\n"


def test_the_reboot_line_runs_the_agent_and_refuses_what_cron_would_misread():
    assert LINE.startswith("@reboot cd && PATH=/usr/local/bin:/usr/bin:/bin ") and LINE.endswith("# flambe-autostop")
    assert "PYTHONPATH=\"$HOME/.flambe/autostop.zip\"" in LINE and "-m flambe_iac.agent run" in LINE
    for path in ("/opt/50%/bin", "/bin\n* * * * * evil"):
        with pytest.raises(CrontabError):
            reboot_line("/usr/bin/python3", path)
    assert "'/opt/my bin:/usr/bin'" in reboot_line("/usr/bin/python3", "/opt/my bin:/usr/bin")


# Decisions, on a clock of the test's own.

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class NoMetadata:
    token = None
    answered = False

    def interruption(self):
        return None


def watch_with(tmp_path, monkeypatch, signals: list, minutes=1.0, factories=(), shutdown_code=0, **settings):
    """A Watch whose samples are SIGNALS (a list the test changes) and whose commands are recorded; SETTINGS are
    the agent's others (member_id, ray_stop, ...)."""
    clock = Clock()
    config = AgentConfig(**{"minutes": minutes, "role": "orchestrator" if factories else "factory", "member_id": "i-1",
                            "user": "ubuntu", "factories": tuple(factories), **settings})
    (tmp_path / ".flambe").mkdir(exist_ok=True)
    agent = Watch(tmp_path, config, clock=clock, metadata=NoMetadata(), wall=clock)
    agent.sample = lambda: list(signals)
    ran = []

    def run_quietly(argv, timeout, limit=0):
        ran.append(tuple(argv))
        return type("Done", (), {"returncode": shutdown_code, "stderr": "sudo: a password is required\n",
                                 "stdout": ""})()
    monkeypatch.setattr(watch_module, "run_quietly", run_quietly)
    return agent, clock, ran


def test_a_member_stops_after_the_window_without_work_and_work_resets_it(tmp_path, monkeypatch):
    signals = ["gpu 90%"]
    agent, clock, ran = watch_with(tmp_path, monkeypatch, signals)
    agent.step()
    signals.clear()
    clock.now += 50
    agent.step()
    assert ran == [] and agent.state.stops_in_minutes == pytest.approx(1 / 6, abs=0.01)
    signals.append("1 ssh session")
    clock.now += 30
    agent.step()
    signals.clear()
    clock.now += 59
    agent.step()
    assert ran == [] and agent.state.last_busy == "1 ssh session"
    clock.now += 1
    agent.step()
    assert ran == [SHUTDOWN] and agent.state.state == "stopping"
    clock.now += 120
    agent.step()
    assert ran == [SHUTDOWN]  # once
    assert parse_state((tmp_path / ".flambe" / "autostop.state").read_bytes()).state == "stopping"


def test_a_fresh_agent_waits_a_whole_window_and_a_refused_stop_says_why(tmp_path, monkeypatch):
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], shutdown_code=1)
    clock.now += 59
    agent.step()
    assert ran == []
    clock.now += 1
    agent.step()
    assert agent.state.state == "stop refused" and "a password is required" in agent.state.cause


def test_the_orchestrator_waits_while_a_factory_works(tmp_path, monkeypatch):
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], factories=["10.0.0.3", "10.0.0.4"])
    verdicts = {"10.0.0.3": "busy (gpu 80%)", "10.0.0.4": None}
    agent.members.verdict = verdicts.get
    clock.now += 61
    agent.step()
    assert ran == [] and agent.state.state == "waiting for factories"
    assert agent.state.waiting_for == ["10.0.0.3: busy (gpu 80%)"]
    verdicts["10.0.0.3"] = None
    clock.now += 60
    agent.step()
    assert ran == [SHUTDOWN] and agent.state.waiting_for == []


def record_text(now: int = 5000, **fields) -> str:
    """What the probe prints: the factory's clock, then its state record."""
    return f"{now}\n" + AgentState(**{"pid": 1, "role": "factory", "minutes": 5, "updated_at": 4990.0,
                                       **fields}).to_bytes().decode()


@pytest.mark.parametrize("code, output, verdict", [
    (0, record_text(state="stopping"), None),
    (0, record_text(state="preempted", updated_at=1.0), None),
    (0, record_text(idle_minutes=5.0), None),
    (0, record_text(idle_minutes=9.0, state="stop refused", cause="sudo -n shutdown: no"),
     "its stop was refused (sudo -n shutdown: no)"),
    (0, record_text(idle_minutes=1, last_busy="gpu 80%"), "busy (gpu 80%)"),
    (0, record_text(idle_minutes=5.0, updated_at=100.0), "its agent has not written its state lately"),
    (0, "not a clock\n" + record_text(idle_minutes=5.0).split("\n", 1)[1],
     "its agent has not written its state lately"),
    (1, "", "no agent state there"),
    (0, "5000\ngarbage", "its state record is not JSON (a full disk can leave it truncated)"),
])
def test_what_the_orchestrator_reads_of_a_factory(tmp_path, monkeypatch, code, output, verdict):
    agent, _, ran = watch_with(tmp_path, monkeypatch, [], factories=["10.0.0.3"])
    monkeypatch.setattr(watch_module, "run_quietly", lambda argv, timeout, limit=0: ran.append(argv) or
                        commands_module.Answer(code, output, ""))
    assert agent.members.verdict("10.0.0.3") == verdict
    (argv,) = ran
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv and "IdentitiesOnly=yes" in argv
    assert str(tmp_path / "ray_bootstrap_key.pem") in argv
    assert argv[-1].startswith(f": {PROBE_MARK}; ") and argv[-1].endswith("; :")


def test_a_factory_that_answers_nothing_has_stopped_only_after_two_minutes_of_silence(tmp_path, monkeypatch):
    agent, clock, _ = watch_with(tmp_path, monkeypatch, [], factories=["10.0.0.3"])
    answers = [None, commands_module.Answer(255, "", "Connection timed out")]
    monkeypatch.setattr(watch_module, "run_quietly", lambda argv, timeout, limit=0: answers[0])
    assert agent.members.verdict("10.0.0.3") == "no answer for 0 s"
    clock.now += 119
    answers[0] = answers[1]
    assert agent.members.verdict("10.0.0.3") == "no answer for 119 s"
    clock.now += 1
    assert agent.members.verdict("10.0.0.3") is None


@pytest.mark.parametrize("stderr, words", [("ubuntu@10.0.0.3: Permission denied (publickey).", "Permission denied"),
                                           ("Host key verification failed.", "Host key verification failed")])
def test_a_factory_whose_sshd_refuses_the_probe_is_up_never_stopped(tmp_path, monkeypatch, stderr, words):
    """A factory left on an old cluster key (down during a rotation) still works: its refusal is no silence."""
    agent, clock, _ = watch_with(tmp_path, monkeypatch, [], factories=["10.0.0.3"])
    monkeypatch.setattr(watch_module, "run_quietly", lambda argv, timeout, limit=0: commands_module.Answer(
        255, "", stderr))
    for _ in range(3):
        assert agent.members.verdict("10.0.0.3") == f"it is up but refuses the cluster's SSH ({words})"
        clock.now += 100


def test_an_answer_is_read_only_up_to_its_limit():
    answer = commands_module.run_quietly(["sh", "-c", "head -c 100000 /dev/zero; echo done >&2"], 10, limit=1000)
    assert answer is not None and len(answer.stdout) == 1000 and answer.stderr == "done\n"
    assert commands_module.run_quietly(["sleep", "5"], 0.2) is None
    assert commands_module.run_quietly(["/nonexistent/command"], 1) is None


def test_a_failing_round_is_logged_and_the_agent_keeps_watching(capsys):
    def broken():
        raise RecursionError("deep")
    watch_module.guarded(broken)
    assert "broken failed: RecursionError: deep" in capsys.readouterr().out


def test_the_record_not_written_on_a_full_disk_is_logged_not_fatal(tmp_path, monkeypatch, capsys):
    agent, _, _ = watch_with(tmp_path, monkeypatch, [])

    def full(*arguments):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(watch_module, "write_atomically", full)
    agent.step()
    assert "No space left on device" in capsys.readouterr().out


def test_samples_come_each_minute_and_six_times_a_short_window():
    assert sample_seconds(30) == 60 and sample_seconds(0.2) == 2 and sample_seconds(0.01) == 1


# The metadata service's notice (the lab's stand-in serves it as EC2 does: IMDSv2 tokens only).

@pytest.fixture
def metadata(request, tmp_path):
    """The lab's stand-in on a local port: (the service as the agent asks it, the stand-in's mode file)."""
    mode_file = tmp_path / "metadata-mode"
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(time.time() + request.param, mode_file))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield MetadataService(f"http://127.0.0.1:{server.server_address[1]}"), mode_file
    server.shutdown()


@pytest.mark.parametrize("metadata", [3600.0], indirect=True)
def test_no_notice_until_there_is_one(metadata):
    service, _ = metadata
    assert service.interruption() == NO_NOTICE and service.answered


@pytest.mark.parametrize("metadata", [-1.0], indirect=True)
def test_a_notice_with_its_action_and_time_and_an_expired_token_renewed_at_once(metadata):
    service, _ = metadata
    notice = service.interruption()
    assert notice.action == "terminate" and notice.words.startswith("terminate at 20") and notice.cause is None
    service.token = "expired"  # refused (401): a new token, and the question asked again, in the same call
    assert service.interruption() == notice and service.token != "expired"
    assert service.answered


def test_no_service_is_no_answer():
    absent = MetadataService("http://127.0.0.1:9", deadline=0.2)
    assert absent.interruption() is None and not absent.answered


# The runner answers notices with on_preempt.

class Checkpointing(Runnable):
    def __init__(self, behaviour):
        self.behaviour, self.calls = behaviour, []

    def on_preempt(self, host_id, interruption):
        self.calls.append((host_id, interruption))
        if self.behaviour == "raise":
            raise RuntimeError("disk full")
        if self.behaviour == "hang":
            threading.Event().wait(5)


def notice(directory: Path, host: str, text="terminate at 2026-11-30T10:00:00Z", at: float | None = None):
    directory.mkdir(exist_ok=True)
    record = {"host": host, "interruption": text, "at": time.time() if at is None else at}
    (directory / f"{host}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("behaviour, outcome", [
    ("return", "on_preempt returned"),
    ("raise", "on_preempt raised RuntimeError: disk full"),
    ("hang", "on_preempt did not return within 90 s"),
])
def test_each_notice_calls_on_preempt_once_and_leaves_its_outcome(tmp_path, monkeypatch, behaviour, outcome):
    monkeypatch.setattr("flambe_iac.runnable.ON_PREEMPT_SECONDS", 0.3)
    runnable = Checkpointing(behaviour)
    notice(tmp_path, "i-0abc")
    answer_notices(runnable, tmp_path, time.time())
    answer_notices(runnable, tmp_path, time.time())
    assert runnable.calls == [("i-0abc", "terminate at 2026-11-30T10:00:00Z")]
    assert (tmp_path / "i-0abc.done").read_text() == outcome + "\n"


def test_a_runnable_without_on_preempt_and_an_unreadable_notice(tmp_path):
    class Plain(Runnable):
        pass
    notice(tmp_path, "i-1")
    (tmp_path / "i-2.json").write_text("{broken")
    answer_notices(Plain(), tmp_path, time.time())
    assert (tmp_path / "i-1.done").read_text() == "the runnable has no on_preempt\n"
    assert (tmp_path / "i-2.done").read_text() == "an unreadable notice: on_preempt not called\n"
    answer_notices(Plain(), tmp_path / "missing", time.time())  # no notice directory yet: nothing to do


# What the agent refuses on the host.

def test_a_crontab_that_cannot_be_read_is_never_rewritten(monkeypatch):
    from flambe_iac.agent import crontab

    answers = {"no crontab for ubuntu\n": (1, b""), "crontab: cannot open: Permission denied\n": (1, b""),
               "": (0, b"@daily true\n")}
    written = []
    for stderr, (code, stdout) in answers.items():
        def fake_run(argv, **options):
            if argv == ["crontab", "-l"]:
                return type("Done", (), {"returncode": code, "stdout": stdout, "stderr": stderr.encode()})()
            written.append(options.get("input"))
            return type("Done", (), {"returncode": 0, "stdout": b"", "stderr": b""})()
        monkeypatch.setattr(crontab.subprocess, "run", fake_run)
        if "Permission denied" in stderr:
            with pytest.raises(CrontabError, match="crontab -l failed: crontab: cannot open"):
                crontab.update_crontab(lambda current: with_agent(current, LINE))
        else:
            assert crontab.update_crontab(lambda current: with_agent(current, LINE))
    assert written == [LINE.encode() + b"\n", b"@daily true\n" + LINE.encode() + b"\n"]


def test_a_notice_names_a_host_id_never_a_path(tmp_path, monkeypatch):
    from flambe_iac.agent.__main__ import Refused, notice

    (tmp_path / ".flambe").mkdir()
    for host_id in ("../../.ssh/authorized_keys", "a/b", "", "-rf", "x" * 200):
        with pytest.raises(Refused):
            notice(tmp_path, host_id, "terminate at now")
    assert not (tmp_path / ".flambe" / "preempted").exists()
    assert notice(tmp_path, "i-0abc", "terminate at now") == "no runnable runs here"
    assert json.loads((tmp_path / ".flambe" / "preempted" / "i-0abc.json").read_text())["host"] == "i-0abc"


def test_stale_notices_are_answered_without_a_call(tmp_path):
    runnable = Checkpointing("return")
    started = time.time()
    notice(tmp_path, "i-old", at=started - 1000)  # its own record: left long before this run began
    answer_notices(runnable, tmp_path, started)
    assert runnable.calls == [] and "from before this run" in (tmp_path / "i-old.done").read_text()


def test_a_clock_that_jumps_forward_during_the_run_never_makes_a_notice_of_this_run_stale(tmp_path, monkeypatch):
    runnable = Checkpointing("return")
    started = time.time()
    notice(tmp_path, "i-0abc", at=started + 5)
    real_time = time.time
    monkeypatch.setattr(runnable_module.time, "time", lambda: real_time() + 3600)  # NTP steps the clock an hour on
    answer_notices(runnable, tmp_path, started)
    assert runnable.calls == [("i-0abc", "terminate at 2026-11-30T10:00:00Z")]
    assert (tmp_path / "i-0abc.done").read_text() == "on_preempt returned\n"


def test_a_symlinked_notice_directory_is_never_read_or_written_and_says_why_once(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    notice(elsewhere, "i-0abc")
    (tmp_path / "preempted").symlink_to(elsewhere)
    runnable = Checkpointing("return")
    rounds = []

    def sleep(seconds):
        rounds.append(seconds)
        if len(rounds) == 3:
            raise StopIteration
    monkeypatch.setattr(runnable_module.time, "sleep", sleep)
    with pytest.raises(StopIteration):
        answer_preemptions(runnable, tmp_path / "preempted")
    assert runnable.calls == [] and sorted(path.name for path in elsewhere.iterdir()) == ["i-0abc.json"]
    assert capsys.readouterr().out == (
        "~/.flambe/preempted is a symlink, not the runner's directory: its notices are not answered\n")


@pytest.mark.parametrize("target_exists", [False, True])
def test_a_symlinked_done_is_replaced_whole_never_written_through(tmp_path, target_exists):
    users_file = tmp_path / "users_file"
    if target_exists:
        users_file.write_text("the user's own\n")
    notices = tmp_path / "preempted"
    notice(notices, "i-0abc")
    (notices / "i-0abc.done").symlink_to(users_file)
    runnable = Checkpointing("return")
    answer_notices(runnable, notices, time.time())
    assert runnable.calls == [("i-0abc", "terminate at 2026-11-30T10:00:00Z")]
    done = notices / "i-0abc.done"
    assert not done.is_symlink() and done.read_text() == "on_preempt returned\n"
    assert (users_file.read_text() if target_exists else users_file.exists()) == (
        "the user's own\n" if target_exists else False)
    assert sorted(path.name for path in notices.iterdir()) == ["i-0abc.done", "i-0abc.json"]  # no partial left


def test_a_pid_file_that_names_another_process_is_not_the_agent(tmp_path):
    import os

    from flambe_iac.agent.__main__ import running_agent

    (tmp_path / ".flambe").mkdir()
    for text in (str(os.getpid()), "1", "not a pid", ""):
        (tmp_path / ".flambe" / "autostop.pid").write_text(text)
        assert running_agent(tmp_path) is None  # never signalled: it is not `flambe_iac.agent run`


def test_a_refused_install_takes_its_settings_away_so_the_next_deploy_cannot_read_as_unchanged(tmp_path, monkeypatch):
    """An agent still running with older settings, and these new ones matching the deploy's: the step would say
    unchanged while the member runs the old window (or cannot stop at all)."""
    settings = tmp_path / ".flambe" / "autostop.json"
    settings.parent.mkdir()
    settings.write_bytes(AgentConfig(minutes=10, role="factory", member_id="i-1", user="u",
                                     orchestrator="10.0.0.1").to_bytes())

    def refused(config):
        raise agent_main.Refused("u may not run `sudo -n shutdown` here")

    monkeypatch.setattr(agent_main, "check_shutdown_allowed", refused)
    with pytest.raises(agent_main.Refused, match="sudo -n shutdown"):
        agent_main.install(tmp_path)
    assert not settings.exists()


@pytest.mark.parametrize("kind", ["symlink", "huge", "fifo"])
def test_a_notice_that_is_no_plain_record_of_the_agents_is_unreadable_and_never_waited_on(tmp_path, kind):
    """A fifo would hold the runner's notice thread for ever; a symlink would read a file of the user's elsewhere;
    a huge file would be read whole."""
    notices = tmp_path / "preempted"
    notices.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"host": "i-0abc", "interruption": "terminate", "at": time.time()}))
    if kind == "fifo":
        os.mkfifo(notices / "i-0abc.json")
    elif kind == "symlink":
        (notices / "i-0abc.json").symlink_to(elsewhere)
    else:
        (notices / "i-0abc.json").write_text(json.dumps({"host": "i-0abc", "interruption": "x" * 10_000_000,
                                                         "at": time.time()}))
    runnable = Checkpointing("return")
    answer_notices(runnable, notices, time.time())
    assert runnable.calls == []
    assert (notices / "i-0abc.done").read_text() == "an unreadable notice: on_preempt not called\n"
