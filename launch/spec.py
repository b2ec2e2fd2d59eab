"""What a Slurm submission runs and where: cluster options (flags over a profile), sweeps, and the
checks that must pass before anything is submitted. No submitit here.

A stage (launch.stage) runs in-process inside the job through its package's ``__main__.main(argv)``.
Several stages separated by ``--`` form a chain of dependent jobs; an override whose value lists
several values (``optim.lr=1e-3,2e-3``) makes a sweep: a job array with one run directory per point.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.stage import Stage  # also where pickles of jobs submitted before it moved find it
from pretrain import CONFIGS
from pretrain.config import ConfigError, build, load_yaml

PROFILES_DIR = CONFIGS / "launch"


@dataclass
class SlurmOptions:
    """Resources and policy of every job of one submission (``configs/launch/*.yaml`` holds the same keys)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # one task per GPU when None (1 on a CPU cluster)
    cpus_per_task: int | None = None
    mem: str | None = None  # Slurm's syntax: 64G, 500000M
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "60"  # minutes, or [D-]HH:MM[:SS]
    exclude: str | None = None
    max_requeues: int = 3  # after a time limit or a preemption; then the job ends as failed
    signal_delay_s: int = 120  # the save-and-requeue signal comes this long before the time limit
    job_name: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, conda activate)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def validate(self) -> None:
        for key in ("nodes", "signal_delay_s"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        for key in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, key)
            _require(value is None or value > 0, key, value, "must be positive")
        _require(self.gpus_per_node >= 0, "gpus_per_node", self.gpus_per_node, "must be >= 0")
        _require(self.max_requeues >= 0, "max_requeues", self.max_requeues, "must be >= 0")
        _require(self.mem is None or re.fullmatch(r"\d+[KMGT]?B?", self.mem, re.I) is not None, "mem", self.mem,
                 "expected a size such as 64G or 500000M")
        time_minutes(self.time)


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"--{key.replace('_', '-')}={value!r}: {why}")


def time_minutes(text: str | int) -> int:
    """Slurm's time formats (``MM``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) as whole minutes (rounded up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ConfigError(f"--time={text!r}: expected minutes or [D-]HH:MM[:SS]")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + first) * 60 + second) * 60 + third
    elif match.group(4) is not None:  # HH:MM:SS
        seconds = (first * 60 + second) * 60 + third
    elif match.group(3) is not None:  # MM:SS
        seconds = first * 60 + second
    else:
        seconds = first * 60
    if seconds <= 0:
        raise ConfigError(f"--time={text!r}: must be positive")
    return -(-seconds // 60)


def load_profile(name: str) -> dict:
    """A cluster profile by name (``configs/launch/NAME.yaml``) or path, checked key by key."""
    path = Path(name).expanduser()
    if not path.suffix:
        path = PROFILES_DIR / f"{name}.yaml"
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError(f"cannot read launch profile {path}: {e.strerror} (profiles here: {known})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    names = {f.name for f in dataclasses.fields(SlurmOptions)}
    if not isinstance(raw, dict) or set(raw) - names:
        bad = sorted(set(raw) - names) if isinstance(raw, dict) else raw
        raise ConfigError(f"{path}: unknown launch keys {bad}; known: {', '.join(sorted(names))}")
    return raw


def resolve_options(profile: str | None, flags: dict) -> SlurmOptions:
    """Dataclass defaults, then the profile, then the command line's flags (those given)."""
    values = load_profile(profile) if profile else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(values.get("time"), int) and not isinstance(values["time"], bool):
        values["time"] = str(values["time"])  # minutes, written as a number in a profile
    options = build(values, SlurmOptions)  # ConfigError naming a key of the wrong type
    options.validate()
    return options


# ---------------------------------------------------------------------------------------------
# Sweeps


def split_values(text: str) -> list[str]:
    """``a,b,c`` at the top level (commas inside [] or {} belong to one YAML value)."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def sweep_base(stage: Stage) -> Stage:
    """The stage without its swept overrides (its run dir holds the sweep's points)."""
    return stage.with_overrides([o for o in stage.overrides if len(split_values(o.partition("=")[2])) == 1])


def sweep_points(stage: Stage) -> list[tuple[str, Stage]]:
    """(label, stage) for each point of the sweep the overrides describe; [] when there is no sweep.

    Every point runs in its own directory under the stage's run dir, named after its values."""
    axes = []
    for item in stage.overrides:
        key, _, text = item.partition("=")
        values = split_values(text)
        if len(values) > 1:
            axes.append([(key, v) for v in values])
    if not axes:
        return []
    base = sweep_base(stage).run_dir()
    fixed = [o for o in sweep_base(stage).overrides if not o.startswith("run.dir=")]
    points = []
    for combo in itertools.product(*axes):
        label = "_".join(f"{k}={re.sub(r'[^A-Za-z0-9.+-]', '-', v)}" for k, v in combo)
        overrides = fixed + [f"{k}={v}" for k, v in combo] + [f"run.dir={base / label}"]
        points.append((label, stage.with_overrides(overrides)))
    return points


# ---------------------------------------------------------------------------------------------
# Checks before submission


def check_stage(stage: Stage, options: SlurmOptions, first: bool = True) -> None:
    """What can be checked before submission: the stage's own checks for the job's world size. A later
    stage of a chain may read what an earlier one will write (``pretrained=RUN_DIR``), so only its
    config is read."""
    stage.run_dir(stage.check(options.world_size) if first else None)


def slurm_partitions() -> list[str]:
    """Partition names as ``sinfo`` lists them."""
    if shutil.which("sinfo") is None:
        raise ConfigError("sinfo not found: is this a Slurm login node? (or use --dry-run to only print the job)")
    result = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise ConfigError(f"sinfo failed ({result.returncode}): {result.stderr.strip()}")
    return sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})


def check_partition(options: SlurmOptions) -> None:
    if options.partition is None:
        return
    known = slurm_partitions()
    if options.partition not in known:
        raise ConfigError(f"--partition={options.partition!r}: no such partition on this cluster "
                          f"(sinfo lists: {', '.join(known) or 'none'})")
