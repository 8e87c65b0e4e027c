"""cluster.yaml is a real cluster-launcher config: Ray's own validation accepts it."""

import copy

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


@pytest.fixture
def cluster_config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation(cluster_config):
    # What `ray up` does before it contacts the cloud: fill in defaults, then validate.
    validate_config(prepare_config(cluster_config))
    types = cluster_config["available_node_types"]
    assert cluster_config["head_node_type"] in types
    assert any(t["resources"].get("GPU") for t in types.values())
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for t in types.values())
    starts = " ".join(
        cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    )
    assert starts.count("RAY_AUTH_MODE=token") == 2


def test_validation_rejects_a_broken_config(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "eight"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))
