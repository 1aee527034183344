"""The step table: the only place a step is declared.

Each entry gives the step's name (as reports show it), what it reads from the one-round-trip host snapshot,
when it applies (to the plan and to each member), and its deploy (a function that adds pyinfra operations for
one host and returns their metas). The deploy command hands TABLE to the engine (`run_deploy(..., table=TABLE)`);
the driver, the snapshot reader, the progress view and the report all read it. To add a step: write its deploy in a
file of its own under deploys/, then add one entry below.
"""

from __future__ import annotations

from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.deploys import (
    autostop,
    cluster_key,
    extensions,
    manifest,
    ray,
    resources,
    runnable,
    s3_resources,
    secrets,
    setup,
)
from flambe_iac.engine.snapshot import SnapshotRequest
from flambe_iac.engine.steps import Step, StepTable, always

STEPS: tuple[Step, ...] = (
    Step("cluster key", lambda context: cluster_key.READS, always, cluster_key.install_cluster_key),
    Step("secrets", lambda context: secrets.READS, lambda plan, member: plan.secrets is not None,
         secrets.push_secrets),
    Step("resources", resources.reads, lambda plan, member: bool(plan.resources), resources.sync_resources),
    Step("s3 resources", s3_resources.reads, lambda plan, member: bool(plan.s3_listings),
         s3_resources.pull_s3_resources),
    Step("extensions", extensions.reads, lambda plan, member: bool(plan.extension_trees),
         extensions.push_extensions),
    Step("install", lambda context: SnapshotRequest(), lambda plan, member: plan.request.install_extensions,
         extensions.install_extensions),
    Step("setup", lambda context: SnapshotRequest(), lambda plan, member: bool(plan.setup_commands),
         setup.run_setup_commands),
    Step("ray", ray.reads, lambda plan, member: plan.request.ray or plan.request.ray_stop, ray.ray_step),
    Step("autostop", autostop.reads, lambda plan, member: plan.autostop is not None, autostop.autostop_step),
    Step("manifest", lambda context: manifest.READS, always, manifest.write_manifest),
    Step("run", runnable.reads, lambda plan, member: plan.request.run and member.role == ORCHESTRATOR,
         runnable.launch_runnable),
)
TABLE = StepTable(STEPS, autostop.AGENTS_SEEN)  # every run reads whether the autostop agent runs
