"""The Pulumi program (`main: stacks/` in Pulumi.yaml): config, then resources, then the contract v1 exports."""

import pulumi

from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config

for key, value in declare_cluster(load_config()).items():
    pulumi.export(key, value)
