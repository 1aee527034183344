"""A runnable that spreads work over the cluster with Ray: one task pinned to each alive node.

Started by `flambe-deploy ray_spread.yaml ... --ray --run`, it runs on the orchestrator with the Ray Python and the
cluster's address in its environment; the token is in Ray's default path. So a plain `ray.init()` joins the cluster.
"""

import json
import socket
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flambe_iac import Runnable


@ray.remote(num_cpus=0)
def hostname() -> str:
    return socket.gethostname()


class Spread(Runnable):
    """Records, in ~/OUTPUT, which host each node's task ran on."""

    def __init__(self, output: str = "ray_spread.json"):
        self.output = output

    def run(self):
        ray.init()
        nodes = [node for node in ray.nodes() if node["Alive"]]
        tasks = [hostname.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                 .remote() for node in nodes]
        result = {"nodes": len(nodes), "hostnames": sorted(ray.get(tasks))}
        (Path.home() / self.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"one task on each of {len(nodes)} nodes: {', '.join(result['hostnames'])}", flush=True)
