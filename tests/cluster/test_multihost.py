"""Several hosts for real: a Ray cluster over network namespaces, stages on different nodes.

Each test's driver is its own process (tests/cluster/driver.py), started in the head's
namespace with address "<head ip>:6379", or in the root namespace through Ray Client
("ray://<head ip>:10001"); the one-process HookedModel in this process is the reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import shardlens as sl
from tests.cluster.netns import NetnsCluster, unavailable

REPO = Path(__file__).resolve().parents[2]
RESID_POST = "blocks.*.hook_resid_post"
NODES = {"head": {"head": 1}, "node_a": {"node_a": 1, "pool": 1}, "node_b": {"node_b": 1, "pool": 1}}


@pytest.fixture(scope="module")
def namespaces_possible():
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"no multi-host cluster here: {reason}")


@pytest.fixture(scope="module")
def cluster(namespaces_possible):
    """Three Ray nodes (head, node_a, node_b), each in its own network namespace."""
    with NetnsCluster(NODES) as made:
        yield made


@pytest.fixture
def fresh_cluster(namespaces_possible):
    """A cluster of its own, for a test that kills one of its nodes."""
    with NetnsCluster(NODES) as made:
        yield made


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    tokens = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("multihost") / "tokens.safetensors"
    save_file({"tokens": tokens}, str(path))
    return path, tokens


def request_for(tmp_path: Path, **fields: object) -> Path:
    request = {"result": str(tmp_path / "result.json"), "out": str(tmp_path / "out.safetensors"), **fields}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request, default=str))
    return path


def driver_command(task: str, request: Path) -> list[str]:
    return [sys.executable, "-m", "tests.cluster.driver", task, str(request)]


def read_result(request: Path, missing: str, crashed: str = "") -> dict:
    """What the driver wrote for `request`; fails with `missing` when it wrote nothing, and
    with its traceback (then `crashed`) when it crashed."""
    result_path = Path(json.loads(request.read_text())["result"])
    if not result_path.exists():
        raise AssertionError(missing)
    result = json.loads(result_path.read_text())
    assert "crash" not in result, result["crash"] + crashed
    return result


def drive(cluster: NetnsCluster, node: object, task: str, request: Path, timeout: float = 240) -> dict:
    done = cluster.run(node, driver_command(task, request), timeout=timeout, cwd=str(REPO))
    missing = f"the driver wrote no result (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return read_result(request, missing, ray_logs(cluster, "ray_client_server*"))


def ray_logs(cluster: NetnsCluster, pattern: str) -> str:
    """The tails of the cluster's Ray log files matching `pattern`, for a failure message."""
    tails = [f"--- {path}\n{path.read_text(errors='replace')[-1500:]}" for path in sorted(Path(cluster.root).rglob(pattern))]
    return "\n" + "\n".join(tails)


def expected(tiny_checkpoints, tokens):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])
    return model.run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True)


def assert_same(out: Path, reference_loss, reference_cache) -> None:
    got = load_file(str(out))
    assert torch.allclose(got.pop("loss")[0], reference_loss, atol=1e-6)
    assert sorted(got) == sorted(reference_cache) and any(k.endswith("_grad") for k in got)
    for key, value in reference_cache.items():
        assert torch.allclose(got[key], value, atol=1e-5), key


def test_two_stages_pinned_to_two_nodes_equal_one_process(cluster, tiny_checkpoints, tokens_file, tmp_path):
    path, tokens = tokens_file
    request = request_for(
        tmp_path, checkpoint=tiny_checkpoints["llama_gqa"], address=cluster.address, tokens=path,
        stage_resources=[{"node_a": 1}, {"node_b": 1}],
    )
    result = drive(cluster, "head", "trace", request)  # the driver on the head node, address "<head ip>:6379"
    nodes = cluster.members
    assert [p["node"] for p in result["placement"]] == [nodes["node_a"].ip, nodes["node_b"].ip]
    assert_same(tmp_path / "out.safetensors", *expected(tiny_checkpoints, tokens))


def test_default_placement_spreads_the_stages_and_ray_client_drives_from_outside(cluster, tiny_checkpoints, tokens_file, tmp_path):
    path, tokens = tokens_file
    request = request_for(tmp_path, checkpoint=tiny_checkpoints["llama_gqa"], address=cluster.client_address, tokens=path)
    result = drive(cluster, None, "trace", request)  # from the root namespace, through Ray Client
    where = [p["node"] for p in result["placement"]]
    assert len(set(where)) == 2 and set(where) <= {n.ip for n in cluster.members.values()}
    assert_same(tmp_path / "out.safetensors", *expected(tiny_checkpoints, tokens))


CAMPAIGN = """name: across
model: {source: MODEL}
cluster: CLUSTER
data: {path: prompts.jsonl, batch_size: 8, limit: 16}
metric: {kind: logit_diff}
experiments:
  - {name: heads, kind: sweep, points: z, over: [layer, head], positions: [22]}
  - {name: resid, kind: extract, points: "blocks.*.hook_resid_post", layout: token}
output: {path: out, plots: false}
"""


def write_campaign(folder: Path, cluster_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    example = REPO / "examples" / "induction"
    (folder / "prompts.jsonl").write_text((example / "prompts.jsonl").read_text())
    text = CAMPAIGN.replace("MODEL", str(Path(sl.__file__).parent / "data" / "induction")).replace("CLUSTER", cluster_line)
    (folder / "campaign.yaml").write_text(text)
    return folder / "campaign.yaml"


def test_a_campaign_across_nodes_equals_a_single_node_run(cluster, tmp_path):
    import pyarrow.parquet as pq

    from shardlens.tracer.campaign import run_campaign

    pinned = f'{{backend: ray, address: "{cluster.address}", stages: 2, stage_resources: [{{node_a: 1}}, {{node_b: 1}}]}}'
    across = write_campaign(tmp_path / "across", pinned)
    done = cluster.run("head", [str(Path(sys.executable).with_name("shardlens")), "run", str(across)], timeout=300, cwd=str(REPO))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    single = write_campaign(tmp_path / "single", "{backend: local, stages: 1}")
    run_campaign(single, progress=False)
    parts = {p.relative_to(tmp_path / "single" / "out") for p in (tmp_path / "single" / "out").rglob("*.parquet")}
    assert parts and parts == {p.relative_to(tmp_path / "across" / "out") for p in (tmp_path / "across" / "out").rglob("*.parquet")}
    for part in sorted(parts):
        a, b = pq.read_table(tmp_path / "across" / "out" / part), pq.read_table(tmp_path / "single" / "out" / part)
        assert a.schema == b.schema and a.num_rows == b.num_rows, part
        for name in a.schema.names:
            left, right = _numbers(a.column(name)), _numbers(b.column(name))
            if left is None:
                assert a.column(name).equals(b.column(name)), (part, name)
            else:  # floating point: the same arithmetic, in other processes with other thread counts
                assert np.allclose(left, right, atol=1e-5, rtol=1e-5), (part, name)


def _numbers(column):
    """A float column (or fixed-shape tensor column) as one numpy array; None for other columns."""
    import pyarrow as pa

    array = column.combine_chunks()
    if isinstance(array.type, pa.FixedShapeTensorType):
        return array.to_numpy_ndarray()
    return array.to_numpy() if pa.types.is_floating(array.type) else None


def start_failover_driver(cluster: NetnsCluster, tmp_path: Path, request: Path) -> subprocess.Popen:
    log = open(tmp_path / "driver.log", "w")
    return cluster.popen("head", driver_command("failover", request), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)


def wait_for(path: Path, process: subprocess.Popen, tmp_path: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the driver never became ready:\n{(tmp_path / 'driver.log').read_text()[-4000:]}")
        time.sleep(0.2)
    return json.loads(path.read_text())


def finish(process: subprocess.Popen, request: Path, tmp_path: Path, timeout: float = 240) -> dict:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the driver did not finish:\n{(tmp_path / 'driver.log').read_text()[-4000:]}") from None
    return read_result(request, f"the driver wrote no result:\n{(tmp_path / 'driver.log').read_text()[-4000:]}")


def test_a_lost_node_fails_over_to_a_surviving_one(fresh_cluster, tiny_checkpoints, tokens_file, tmp_path):
    path, tokens = tokens_file
    with torch.no_grad():
        reference = float(sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])(tokens, return_type="loss"))
    request = request_for(
        tmp_path, checkpoint=tiny_checkpoints["llama_gqa"], address=fresh_cluster.address, tokens=path,
        stage_resources=[{"head": 1}, {"pool": 1}], ready=tmp_path / "ready", slow_point="blocks.2.hook_resid_post", runs=12,
    )
    process = start_failover_driver(fresh_cluster, tmp_path, request)
    placement = wait_for(tmp_path / "ready", process, tmp_path)
    by_ip = {node.ip: name for name, node in fresh_cluster.members.items()}
    victim = by_ip[placement[1]["node"]]
    assert victim in ("node_a", "node_b")
    time.sleep(0.1)  # inside the next run's sleeping hook
    fresh_cluster.kill_node(victim)
    result = finish(process, request, tmp_path)
    assert result["error"] is None, result["error"]
    assert result["recoveries"] == 1  # the run in flight when the node died was retried once
    assert len(result["losses"]) == 12 and all(abs(loss - reference) < 1e-5 for loss in result["losses"])
    survivor = ({"node_a", "node_b"} - {victim}).pop()
    assert result["placements"][-1][1]["node"] == fresh_cluster.members[survivor].ip


def test_losing_a_pinned_node_fails_naming_it(fresh_cluster, tiny_checkpoints, tokens_file, tmp_path):
    path, _ = tokens_file
    request = request_for(
        tmp_path, checkpoint=tiny_checkpoints["llama_gqa"], address=fresh_cluster.address, tokens=path,
        stage_resources=[{"node_a": 1}, {"node_b": 1}], ready=tmp_path / "ready", slow_point="blocks.2.hook_resid_post",
        runs=100, seconds=120,
    )
    process = start_failover_driver(fresh_cluster, tmp_path, request)
    wait_for(tmp_path / "ready", process, tmp_path)
    started = time.monotonic()
    fresh_cluster.kill_node("node_b")
    result = finish(process, request, tmp_path)
    assert result["error"] is not None and "cannot be restarted" in result["error"], result
    assert "stage 1, replica 0 needs {'node_b': 1}" in result["error"]
    assert f"lost node {fresh_cluster.members['node_b'].ip} (node_b, pool)" in result["error"]
    assert time.monotonic() - started < 60  # it fails as soon as the node is known lost, not after a long timeout
