"""Cluster launch: the role/env computation of `jaxps launch node` for SLURM, Kubernetes and
TPU layouts, SLURM host lists, the rendered templates, and one real 3-task SLURM job
simulated on loopback (1 PS server + 2 workers of one group)."""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jaxps.launch.layout import Layout, Peers, Role, environment, rank_of, role_of, server_argv
from jaxps.launch.local import free_port
from jaxps.launch.node import (add_node_args, k8s_assignment, layout_from_args, rank_hosts, read_token,
                               slurm_assignment, tpu_assignment)
from jaxps.launch.nodelist import expand_nodelist, tasks_per_node
from jaxps.launch.render import ClusterOptions, node_argv, render

PROGRAM = ["jaxps", "train", "model.placement=host", "data.train=a b.svm"]


# ------------------------------------------------------------------ host lists
def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("localhost") == ["localhost"]
    assert expand_nodelist("r[1-2]-n[8-10]") == ["r1-n8", "r1-n9", "r1-n10", "r2-n8", "r2-n9", "r2-n10"]
    assert expand_nodelist("a[098-101]") == ["a098", "a099", "a100", "a101"]
    for bad in ("node[1-", "node]1[", "node[3-1]", "node[x]"):
        with pytest.raises(ValueError):
            expand_nodelist(bad)


def test_tasks_per_node_and_rank_hosts():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert rank_hosts(3, ["a", "b", "c", "d"]) == ["a", "b", "c"]       # one rank per node
    assert rank_hosts(3, ["localhost"]) == ["localhost"] * 3              # all on one node
    assert rank_hosts(4, ["a", "b"], "3,1") == ["a", "a", "a", "b"]      # block distribution
    with pytest.raises(ValueError):
        rank_hosts(4, ["a", "b"])


# ------------------------------------------------------------------ layout
def test_rank_layout_servers_then_workers_group_major_then_manager():
    lay = Layout(servers=2, groups=2, workers_per_group=3, manager=True)
    roles = [role_of(lay, r) for r in range(lay.ranks)]
    assert roles == [Role("server", 0), Role("server", 1),
                     Role("worker", 0, 0), Role("worker", 1, 0), Role("worker", 2, 0),
                     Role("worker", 0, 1), Role("worker", 1, 1), Role("worker", 2, 1), Role("manager")]
    assert [rank_of(lay, r) for r in roles] == list(range(lay.ranks))
    with pytest.raises(ValueError):
        role_of(lay, lay.ranks)
    for bad in (dict(sync="ssp"), dict(sync="bsp:1"), dict(groups=0), dict(servers=-1)):
        with pytest.raises(ValueError):
            Layout(**bad)


def test_token_never_on_a_command_line():
    lay = Layout(servers=2)
    argv = server_argv(lay, 1)
    assert argv[1:3] == ["-m", "jaxps.ps.serve"]
    assert argv[argv.index("--port") + 1] == "7001" and argv[argv.index("--name") + 1] == "ps-1"
    assert argv[argv.index("--token-env") + 1] == "JAXPS_PS_TOKEN"
    env = environment(lay, Role("server", 1), Peers(("a", "b")), "s3cret")
    assert env == {"JAXPS_PS_TOKEN": "s3cret"} and "s3cret" not in argv


# ------------------------------------------------------------------ SLURM
def slurm_env(procid, ntasks, nodelist, **extra):
    return dict({"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NODELIST": nodelist}, **extra)


def test_slurm_worker_environment():
    lay = Layout(servers=2, groups=2, workers_per_group=2, sync="ssp:3", coordinator_port=9000, partitions=64)
    nodes = "node[01-06]"
    a = slurm_assignment(lay, slurm_env(5, 6, nodes), expand=expand_nodelist)  # rank 5: group 1, worker 1
    assert a.roles == (Role("worker", 1, 1),)
    env = environment(lay, a.roles[0], a.peers, "tok")
    assert env == {
        "JAXPS_PS_TOKEN": "tok", "JAXPS_PS_SERVERS": "ps-0=node01:7000,ps-1=node02:7001",
        "JAXPS_PS_PARTITIONS": "64", "JAXPS_PS_REPLICAS": "0",
        "JAXPS_COORDINATOR": "node05:9001", "JAXPS_COORDINATOR_BIND": "0.0.0.0:9001",  # group 1's process 0
        "JAXPS_NUM_PROCESSES": "2", "JAXPS_PROCESS_ID": "1",
        "JAXPS_GROUP": "1", "JAXPS_NUM_GROUPS": "2", "JAXPS_SYNC": "ssp:3"}
    g0 = slurm_assignment(lay, slurm_env(2, 6, nodes), expand=expand_nodelist)
    assert g0.roles == (Role("worker", 0, 0),) and g0.peers.coordinator_host == "node03"
    assert slurm_assignment(lay, slurm_env(1, 6, nodes), expand=expand_nodelist).roles == (Role("server", 1),)


def test_slurm_separate_steps_and_manager():
    """The template's layout: servers, workers and the manager as separate srun steps,
    each with step-local SLURM_PROCID, placed by --rank-offset."""
    lay = Layout(servers=1, groups=1, workers_per_group=2, manager=True)
    nodes = "n[1-4]"
    server = slurm_assignment(lay, slurm_env(0, 1, nodes), 0, expand=expand_nodelist)
    worker = slurm_assignment(lay, slurm_env(1, 2, nodes), 1, expand=expand_nodelist)
    manager = slurm_assignment(lay, slurm_env(0, 1, nodes), 3, expand=expand_nodelist)
    assert (server.roles, worker.roles, manager.roles) == ((Role("server", 0),), (Role("worker", 1),),
                                                           (Role("manager"),))
    env = environment(lay, worker.roles[0], worker.peers, None)
    assert env["JAXPS_PS_MANAGER"] == "n4:7999" and env["JAXPS_COORDINATOR"] == "n2:12345"
    assert environment(lay, Role("manager"), manager.peers, None)["JAXPS_PS_SERVERS"] == "ps-0=n1:7000"
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        slurm_assignment(lay, slurm_env(0, 3, nodes), expand=expand_nodelist)  # 3 tasks, 4 ranks
    assert slurm_assignment(lay, slurm_env(1, 4, nodes, SLURM_STEP_NUM_TASKS="2"), 1,  # the step's count wins
                            expand=expand_nodelist).roles == (Role("worker", 1),)
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        slurm_assignment(lay, {"SLURM_JOB_NODELIST": nodes})


# ------------------------------------------------------------------ Kubernetes
def test_k8s_roles_from_pod_names():
    lay = Layout(servers=2, groups=2, workers_per_group=3, manager=True)
    a = k8s_assignment(lay, "demo", "demo-g1-2")
    assert a.roles == (Role("worker", 2, 1),)
    env = environment(lay, a.roles[0], a.peers, "t")
    assert env["JAXPS_COORDINATOR"] == "demo-g1-0.demo:12346"
    assert env["JAXPS_PS_SERVERS"] == "ps-0=demo-ps-0.demo:7000,ps-1=demo-ps-1.demo:7001"
    assert env["JAXPS_PS_MANAGER"] == "demo-manager-0.demo:7999"
    assert (env["JAXPS_GROUP"], env["JAXPS_PROCESS_ID"], env["JAXPS_NUM_PROCESSES"]) == ("1", "2", "3")
    assert k8s_assignment(lay, "demo", "demo-ps-1.demo.default.svc.cluster.local").roles == (Role("server", 1),)
    assert k8s_assignment(lay, "demo", "demo-manager-0").roles == (Role("manager"),)
    for bad in ("other-g0-0", "demo-g2-0", "demo-ps-2", "demo-g0-x", "demo-worker-0"):
        with pytest.raises(ValueError):
            k8s_assignment(lay, "demo", bad)
    with pytest.raises(ValueError):
        k8s_assignment(lay, "Bad_Name", "Bad_Name-ps-0")


# ------------------------------------------------------------------ TPU
def test_tpu_single_slice_servers_beside_workers():
    lay = Layout(servers=2, workers_per_group=4)
    hosts = "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4"
    a = tpu_assignment(lay, {"TPU_WORKER_ID": "1", "TPU_WORKER_HOSTNAMES": hosts})
    assert a.roles == (Role("worker", 1), Role("server", 1))
    env = environment(lay, a.roles[0], a.peers, "t")
    assert env["JAXPS_COORDINATOR"] == "10.0.0.1:12345" and env["JAXPS_NUM_PROCESSES"] == "4"
    assert env["JAXPS_PS_SERVERS"] == "ps-0=10.0.0.1:7000,ps-1=10.0.0.2:7001"
    assert tpu_assignment(lay, {"TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": hosts}).roles == (Role("worker", 3),)
    with pytest.raises(ValueError, match="hosts"):
        tpu_assignment(Layout(workers_per_group=2), {"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": hosts})


def test_tpu_multislice_groups():
    base = {"TPU_WORKER_ID": "1", "TPU_WORKER_HOSTNAMES": "s1a,s1b", "MEGASCALE_SLICE_ID": "1",
            "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_COORDINATOR_ADDRESS": "s0a:8080"}
    per_slice = tpu_assignment(Layout(servers=1, groups=2, workers_per_group=2), base)  # a slice = a group
    assert per_slice.roles == (Role("worker", 1, 1),)
    env = environment(Layout(servers=1, groups=2, workers_per_group=2), per_slice.roles[0], per_slice.peers, "t")
    assert env["JAXPS_COORDINATOR"] == "s1a:12346" and env["JAXPS_PS_SERVERS"] == "ps-0=s0a:7000"
    one = tpu_assignment(Layout(groups=1, workers_per_group=4), base)           # one group over the slices
    assert one.roles == (Role("worker", 3, 0),) and one.peers.coordinator_host == "s0a"
    with pytest.raises(ValueError):
        tpu_assignment(Layout(servers=2, groups=2, workers_per_group=2), base)


# ------------------------------------------------------------------ token
def test_read_token(tmp_path):
    f = tmp_path / "token"
    f.write_text("abc123\n")
    f.chmod(0o600)
    assert read_token(str(f), {}) == "abc123"
    assert read_token(None, {"JAXPS_PS_TOKEN": "fromenv"}) == "fromenv"
    assert read_token(None, {}) is None
    f.write_text("")
    with pytest.raises(ValueError):
        read_token(str(f), {})


# ------------------------------------------------------------------ templates
LAYOUT = Layout(servers=2, groups=2, workers_per_group=3, sync="ssp:2", manager=True, server_port=7100)


def parse_node(argv):
    """Parse a rendered `jaxps launch node` command with the node's own parser."""
    assert argv[:3] == ["jaxps", "launch", "node"], argv
    p = argparse.ArgumentParser()
    add_node_args(p)
    return layout_from_args(p.parse_args(argv[3:]), bind=Layout.bind)


def test_node_argv_round_trips():
    assert parse_node(node_argv(LAYOUT)) == LAYOUT


def bash_syntax_ok(text, tmp_path):
    if shutil.which("bash"):
        f = tmp_path / "script.sh"
        f.write_text(text)
        out = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_render_slurm(tmp_path):
    text = render("slurm", LAYOUT, PROGRAM, ClusterOptions(job="ctr", devices_per_worker=4, time="2:00:00"))
    bash_syntax_ok(text, tmp_path)
    assert "{{" not in text and text.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=9" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --time=2:00:00" in text
    node = re.search(r"^NODE=\((.*)\)$", text, re.M).group(1)
    assert parse_node(shlex.split(node)[:-2]) == LAYOUT and shlex.split(node)[-2:] == ["--scheduler", "slurm"]
    assert shlex.split(re.search(r"^PROGRAM=\((.*)\)$", text, re.M).group(1)) == PROGRAM
    assert '-- "${PROGRAM[@]}"' in text and "--gpus-per-task=4" in text and "--token-file" in text
    assert re.search(r"^SERVERS=2$", text, re.M) and re.search(r"^WORKERS=6$", text, re.M)


def k8s_docs(text):
    try:
        import yaml
    except ImportError:
        return None
    return [d for d in yaml.safe_load_all(text) if d]


def test_render_k8s():
    text = render("k8s", LAYOUT, PROGRAM, ClusterOptions(job="ctr", image="reg/jaxps:1", devices_per_worker=2))
    assert "{{" not in text
    commands = [json.loads(m) for m in re.findall(r"^\s+command: (\[.*\])$", text, re.M)]
    assert len(commands) == 4  # servers, 2 worker groups, manager
    for argv in commands:
        cut = argv.index("--") if "--" in argv else len(argv)
        i = argv.index("--scheduler")
        assert argv[i:cut] == ["--scheduler", "k8s", "--job", "ctr", "--token-file", "/var/run/jaxps/token"]
        assert parse_node(argv[:i]) == LAYOUT
    assert [c[c.index("--") + 1:] for c in commands if "--" in c] == [PROGRAM, PROGRAM]
    docs = k8s_docs(text)
    if docs is not None:
        assert [d["kind"] for d in docs] == ["Service"] + ["StatefulSet"] * 4
        svc = docs[0]
        assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["name"] == "ctr"
        sets = {d["metadata"]["name"]: d for d in docs[1:]}
        assert {n: s["spec"]["replicas"] for n, s in sets.items()} == {"ctr-ps": 2, "ctr-g0": 3, "ctr-g1": 3,
                                                                        "ctr-manager": 1}
        for s in sets.values():
            assert s["spec"]["serviceName"] == "ctr"  # pod DNS: <pod>.ctr
            assert s["spec"]["selector"]["matchLabels"].items() <= s["spec"]["template"]["metadata"]["labels"].items()
            assert svc["spec"]["selector"].items() <= s["spec"]["template"]["metadata"]["labels"].items()
            c = s["spec"]["template"]["spec"]["containers"][0]
            assert c["image"] == "reg/jaxps:1" and c["command"] in commands
        gpu = sets["ctr-g0"]["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu == {"limits": {"nvidia.com/gpu": 2}}


def test_render_tpu(tmp_path):
    lay = Layout(servers=1, workers_per_group=4)
    text = render("tpu", lay, PROGRAM, ClusterOptions(tpu="my-v4-32", zone="us-central2-b"))
    bash_syntax_ok(text, tmp_path)
    assert "{{" not in text and "--worker=all" in text and "TPU_WORKER_HOSTNAMES" in text
    line = re.search(r"^exec (jaxps launch node .*)$", text, re.M).group(1)
    argv = shlex.split(line)
    cut = argv.index("--")
    assert parse_node(argv[:argv.index("--scheduler")]) == lay and argv[cut + 1:] == PROGRAM
    with pytest.raises(ValueError):
        render("tpu", Layout(groups=2), PROGRAM, ClusterOptions())
    with pytest.raises(ValueError):
        render("slurm", LAYOUT, [], ClusterOptions())


def test_cli_renders_to_a_file(tmp_path):
    out = tmp_path / "job.sbatch"
    r = subprocess.run([sys.executable, "-m", "jaxps.cli", "launch", "slurm", "--servers", "1",
                        "--workers-per-group", "2", "--out", str(out), "--", "jaxps", "train"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "jaxps launch node" in out.read_text() and "sbatch job.sbatch" in out.read_text()


# ------------------------------------------------------------------ a real SLURM job on loopback
TRAIN = ["train", "model.rows=4096", "data.synthetic.n_train=4000", "data.synthetic.n_test=1000",
         "data.batch_size=512", "train.progress=false", "train.checkpoint=false", "train.tensorboard=false",
         "train.out_dir=out", "data.synthetic.dir=syn"]


@pytest.mark.slow
def test_simulated_slurm_job_on_loopback(tmp_path):
    """3 SLURM tasks on one node: task 0 becomes the PS server, tasks 1-2 the two workers of
    group 0; each runs `jaxps launch node -- jaxps train` with only the SLURM variables."""
    token = tmp_path / "token"
    token.write_text("loopback-token\n")
    token.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith(("JAXPS_", "SLURM_"))}
    jaxps = [sys.executable, "-m", "jaxps.cli"]
    node = jaxps + ["launch", "node", "--servers", "1", "--groups", "1", "--workers-per-group", "2",
                    "--server-port", str(free_port()), "--coordinator-port", str(free_port()), "--bind", "127.0.0.1",
                    "--cpu-devices", "2", "--token-file", str(token), "--server-wait", "60", "--"] + jaxps + TRAIN
    procs = []
    try:
        for rank in range(3):
            env = dict(base, SLURM_PROCID=str(rank), SLURM_NTASKS="3", SLURM_JOB_NODELIST="localhost",
                       PATH=os.pathsep.join(p for p in base.get("PATH", "").split(os.pathsep)
                                            if not os.path.exists(os.path.join(p, "scontrol"))))
            procs.append(subprocess.Popen(node, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
        server, workers = procs[0], procs[1:]
        deadline = time.monotonic() + 240
        for w in workers:
            w.wait(timeout=max(1.0, deadline - time.monotonic()))
        outputs = [w.stdout.read() for w in workers]
        for w, out in zip(workers, outputs):
            assert w.returncode == 0, out[-4000:]
        assert server.poll() is None, "the server exited during training"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    server_out = server.stdout.read()
    assert "jaxps launch node: server 0" in server_out and "jaxps ps-server ps-0 listening on 127.0.0.1:" in server_out
    assert "jaxps ps-server ps-0 stopped" in server_out  # SIGTERM reached the exec'd server: graceful stop
    assert "worker 0 of group 0" in outputs[0] and "worker 1 of group 0" in outputs[1]
    assert "loopback-token" not in server_out + "".join(outputs)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train"]["steps"] > 0 and metrics["eval"]["examples"] == 1000


def test_tpu_host_runs_its_server_beside_its_worker(tmp_path):
    """A TPU host that also hosts server 0: the node starts the server, waits for it, runs
    the worker, and stops the server when the worker is done."""
    token = tmp_path / "token"
    token.write_text("t0k\n")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXPS_", "SLURM_", "MEGASCALE_"))}
    env.update(TPU_WORKER_ID="0", TPU_WORKER_HOSTNAMES="127.0.0.1")
    probe = ("import os, socket; h, p = os.environ['JAXPS_PS_SERVERS'].split('=')[1].rsplit(':', 1); "
             "socket.create_connection((h, int(p)), timeout=5).close(); "
             "print('probe', os.environ['JAXPS_PROCESS_ID'], os.environ['JAXPS_NUM_PROCESSES'], "
             "os.environ['JAXPS_PS_TOKEN'] == 't0k')")
    r = subprocess.run([sys.executable, "-m", "jaxps.cli", "launch", "node", "--scheduler", "tpu", "--servers", "1",
                        "--server-port", str(free_port()), "--bind", "127.0.0.1", "--token-file", str(token), "--",
                        sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "probe 0 1 True" in r.stdout and "jaxps ps-server ps-0 stopped" in r.stdout
