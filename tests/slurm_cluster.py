"""A real Slurm cluster on this machine, for tests: Debian's slurm-wlm 22.05 and munge, the
controller in the host's namespaces, each node's slurmd in a network, UTS and PID namespace of its own
on a bridge this module creates (198.18.K.0/24, a benchmarking range no real network routes), all
sharing the filesystem. Everything it starts it stops by PID; everything it creates it removes.

Why it is built this way (what was seen to work here): munged runs as the `munge` user; a node is
entered with `nsenter --net` + `unshare --uts --pid --fork --kill-child --mount-proc` (`ip netns
exec` remounts /sys, where slurmd's cgroup plugin then fails); each node's PID 1 is a bash that
reaps what Ray leaves orphaned; each node's jobs get a TMPDIR of their own through a TaskProlog, as
many clusters give them node-local scratch; no accounting, so the sweep's exit code comes from the
job directory, as on clusters that give their users none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "nsenter", "unshare", "ip")
CPUS_PER_NODE = 4  # more than this machine has (config_overrides): two jobs share a node, as on a cluster


def missing() -> str | None:
    """Why a cluster cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge; CI installs them)" if absent else None


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit code {done.returncode}: {done.stderr.strip()}")


@dataclass
class SlurmCluster:
    """`nodes` slurmds named n1, n2, ... and their controller; `env` is what a client needs."""

    nodes: int = 2
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lgs-")))  # short: Ray's socket paths
    tag: int = field(default_factory=lambda: 10 + os.getpid() % 200)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # what a client needs (SLURM_CONF, from start())

    @property
    def names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def ip(self, i: int) -> str:
        return f"198.18.{self.tag}.{i}"  # .1: the host's end of the bridge; nodes from .11

    def start(self) -> SlurmCluster:
        self.base.chmod(0o755)  # munged, as its own user, reaches its socket below it
        self.env["SLURM_CONF"] = str(self.base / "slurm.conf")
        try:
            self._network()
            self._munge()
            self._config()
            self.procs["slurmctld"] = subprocess.Popen(
                ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.base / "slurm.conf")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name in self.names:
                self.procs[name] = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/lgs{self.tag}{name}", "unshare", "--uts", "--pid", "--fork",
                     "--kill-child", "--mount-proc", "bash", "-c",
                     f"hostname {name}; /usr/sbin/slurmd -D -N {name} -f {self.base}/slurm.conf & wait"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        bridge = f"lgs{self.tag}br"
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.ip(1)}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for i, name in enumerate(self.names, start=1):
            ns, veth = f"lgs{self.tag}{name}", f"lgs{self.tag}v{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", veth, "master", bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(10 + i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _munge(self) -> None:
        munge = self.base / "munge"
        munge.mkdir(mode=0o711)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={munge}/munge.sock",
             f"--key-file={key}", f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
             f"--seed-file={munge}/seed")

    def _config(self) -> None:
        b = self.base
        for d in ("state", "spool", "logs", *[f"tmp/{n}" for n in self.names]):
            (b / d).mkdir(parents=True)
        prolog = b / "task-prolog.sh"  # each node's jobs: their own scratch, as TMPDIR
        prolog.write_text(f'#!/bin/sh\necho "export TMPDIR={b}/tmp/$SLURMD_NODENAME"\n')
        prolog.chmod(0o755)
        nodes = "".join(f"NodeName={n} NodeAddr={self.ip(10 + i)} CPUs={CPUS_PER_NODE} RealMemory=4000\n"
                        for i, n in enumerate(self.names, start=1))
        (b / "slurm.conf").write_text(f"""ClusterName=lgs{self.tag}
SlurmctldHost={os.uname().nodename}({self.ip(1)})
SlurmctldPort={free_port()}
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={b}/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.%n.pid
SlurmctldLogFile={b}/logs/slurmctld.log
SlurmdLogFile={b}/logs/slurmd.%n.log
TaskProlog={prolog}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
{nodes}PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                                  env={**os.environ, **self.env})
            states = dict(line.split() for line in done.stdout.splitlines())
            if sorted(states) == self.names and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm nodes did not come up within {timeout_s:g} s (logs: {self.base}/logs)")

    def node_pids(self, name: str) -> list[int]:
        """Every process in node `name`'s PID namespace, its PID 1 (bash) and slurmd excepted."""
        init = self._init_pid(name)
        own = os.readlink(f"/proc/{init}/ns/pid")
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != init:
                try:
                    if os.readlink(entry / "ns" / "pid") == own and \
                            not (entry / "cmdline").read_bytes().startswith(b"/usr/sbin/slurmd"):
                        pids.append(int(entry.name))
                except OSError:
                    continue  # ended meanwhile
        return pids

    def _init_pid(self, name: str) -> int:
        """The node's PID 1 as the host sees it: the child of its unshare."""
        children = Path(f"/proc/{self.procs[name].pid}/task/{self.procs[name].pid}/children").read_text().split()
        return int(children[0])

    def cmdline(self, pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop everything started, by PID; remove the network and the files."""
        for name in [*self.names, "slurmctld"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.kill()  # a node: its unshare's child, the namespace's PID 1, goes with it (--kill-child)
                proc.wait(timeout=30)
        pid_file = self.base / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", f"lgs{self.tag}{name}"], capture_output=True)
        subprocess.run(["ip", "link", "delete", f"lgs{self.tag}br"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
