"""`python -m launch torchrun` with 2 "nodes" x 1 process on localhost: two launchers (node ranks 0 and
1) meeting at one c10d rendezvous endpoint, as on two machines sharing a run dir."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.dist import STOPPED_EXIT_CODE, free_port
from tests.conftest import QUIET, REPO, TINY_VIT, python_env
from tests.integration.test_launcher import logged_step

RECIPE = str(REPO / "configs/pretrain/digits_supervised.yaml")
JOB = [*QUIET, *TINY_VIT, "data.synthetic=true", "data.num_classes=10", "engine.precision=fp32", "train.epochs=null",
       "train.log_every=1", "train.eval_every=0", "data.batch_size=16", "data.val=null", "data.prepare=none"]


class Nodes:
    """The two launchers of one run, their output in files (a pipe nobody reads could block them)."""

    def __init__(self, tmp_path: Path, steps: int) -> None:
        self.run_dir, self.logs = tmp_path / "run", [tmp_path / "node0.log", tmp_path / "node1.log"]
        endpoint = f"127.0.0.1:{free_port()}"
        self.launchers: list[subprocess.Popen] = []
        self.seen: list[psutil.Process] = []
        for node, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.launchers.append(subprocess.Popen(
                    [sys.executable, "-m", "launch", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                     "--rdzv-endpoint", endpoint, "--node-rank", str(node), "--", RECIPE, f"run.dir={self.run_dir}",
                     f"train.steps={steps}", *JOB],
                    cwd=REPO, env=python_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def family(self, node: int) -> list[psutil.Process]:
        """The node's launcher, its torchrun agent and its rank."""
        launcher = psutil.Process(self.launchers[node].pid)
        processes = [launcher, *launcher.children(recursive=True)]
        self.seen += processes
        return processes

    def wait_training(self, past: int = 2, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while logged_step(self.run_dir) < past:
            assert all(p.poll() is None for p in self.launchers), self.output()
            assert time.monotonic() < deadline, "the ranks did not start training\n" + self.output()
            time.sleep(0.2)
        for node in (0, 1):
            assert len(self.family(node)) == 3, [p.cmdline()[:5] for p in self.family(node)]

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(max(0.1, deadline - time.monotonic())) for p in self.launchers]

    def output(self, node: int | None = None) -> str:
        shown = (0, 1) if node is None else (node,)
        return "".join(f"--- node {n}\n{self.logs[n].read_text()[-4000:]}" for n in shown)

    def close(self) -> None:
        """SIGKILL whatever of this run is left, and check that nothing is."""
        for node, launcher in enumerate(self.launchers):
            if launcher.poll() is None:
                self.family(node)
        for process in self.seen + [p for p in psutil.process_iter(["cmdline"])
                                    if f"run.dir={self.run_dir}" in (p.info["cmdline"] or [])]:
            try:
                process.kill()
            except psutil.Error:
                pass
        for p in self.launchers:
            p.wait()
        _, alive = psutil.wait_procs(self.seen, timeout=10)
        assert not alive, alive


def test_two_nodes_train_to_the_end_and_node_0_holds_the_run_dir(tmp_path):
    nodes = Nodes(tmp_path, steps=3)
    try:
        codes = nodes.wait(timeout=180)
    finally:
        nodes.close()
    assert codes == [0, 0], nodes.output()
    assert (nodes.run_dir / "export" / "backbone.safetensors").is_file()
    assert 3 in [json.loads(line).get("step") for line in (nodes.run_dir / "metrics.jsonl").read_text().splitlines()]
    # torchrun's global rank 0 may be on either node; the lock is node rank 0's launcher's.
    assert json.loads((nodes.run_dir / "run.lock").read_text())["pid"] == nodes.launchers[0].pid


@pytest.mark.parametrize("target", ["node 1's launcher", "every process"])
def test_sigterm_saves_and_stops_every_node(tmp_path, target):
    """SIGTERM to one node's launcher (not the node holding the run dir: any node may be told), or to
    every process of both nodes at once (systemd, a cgroup kill: launchers, torchrun agents and ranks;
    torchrun's own SIGTERM handling would stop the ranks mid-save)."""
    nodes = Nodes(tmp_path, steps=5000)
    try:
        nodes.wait_training()
        chosen = [psutil.Process(nodes.launchers[1].pid)] if target != "every process" else \
            nodes.family(0) + nodes.family(1)
        for p in chosen:
            p.send_signal(signal.SIGTERM)
        codes = nodes.wait(timeout=120)
    finally:
        nodes.close()
    assert codes == [STOPPED_EXIT_CODE] * 2, nodes.output()
    step = int((nodes.run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= step < 5000 and f"stopped on request at step {step}" in nodes.output(), nodes.output()


@pytest.mark.parametrize("victim", ["launcher", "rank"])
def test_a_killed_node_ends_the_run_on_the_other_with_a_message(tmp_path, victim):
    """SIGKILL of node 1's launcher (the machine goes away: its agent and rank end with it) or of its
    rank alone (its agent stays, and reports it): node 0 ends within seconds, saying so."""
    nodes = Nodes(tmp_path, steps=5000)
    try:
        nodes.wait_training()
        launcher, *agent_and_rank = nodes.family(1)
        (launcher.children()[0].children()[0] if victim == "rank" else launcher).kill()  # launcher > agent > rank
        killed_at = time.monotonic()
        if victim == "launcher":  # its process group is the launcher alone
            _, orphans = psutil.wait_procs(agent_and_rank, timeout=10)  # they end with their launcher
            assert not orphans, [p.cmdline()[:5] for p in orphans]
        code = nodes.launchers[0].wait(timeout=60)
        took = time.monotonic() - killed_at
        if victim == "rank":
            assert nodes.launchers[1].wait(timeout=30) == 1, nodes.output(1)
    finally:
        nodes.close()
    assert code not in (0, STOPPED_EXIT_CODE), nodes.output(0)
    errors = [line for line in nodes.output(0).splitlines() if line.startswith("error: ")]
    assert errors and ("rendezvous" in errors[-1] or "died" in errors[-1]), nodes.output(0)
    assert took < 30, took
    if victim == "rank":  # node 1 names its rank and how it died
        assert "killed by SIGKILL" in nodes.output(1), nodes.output(1)


def test_a_config_wrong_for_the_whole_world_size_fails_before_anything_starts(tmp_path, capsys):
    from launch.__main__ import main

    run_dir = tmp_path / "run"  # 16 samples a step cannot be split over 3 nodes x 1 process
    code = main(["torchrun", "--nnodes", "3", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--", RECIPE,
                 f"run.dir={run_dir}", "train.steps=3", *JOB, "data.global_batch=16"])
    err = capsys.readouterr().err
    assert code == 2 and "error: data.global_batch=16" in err and "world size 3" in err, err
    assert not run_dir.exists()
