"""``cot2align launch``: start ``cot2align train`` on one node, on a SLURM allocation, or submit it.

Three modes, each rendered first as a ``LaunchPlan`` (what will run, exactly) and then run:

- one node: the deepspeed launcher on the local GPUs (what ``launchers/local.sh`` does);
- several nodes inside an existing allocation (``salloc``, an interactive job): a hostfile built
  from ``SLURM_JOB_NODELIST`` (in ``.cot2align/`` of the working directory, which every node
  must see) and one ``srun`` step that starts one deepspeed launcher per node, with the node's
  CPUs and GPUs requested explicitly (srun does not inherit ``--cpus-per-task`` since Slurm
  22.05). ``multinode="pdsh"`` instead runs one launcher here that reaches the other nodes over
  pdsh/ssh, with the environment DeepSpeed would not forward written to a private env file;
- ``slurm=True``: ``launchers/slurm.sbatch`` with its ``#SBATCH`` header set from the arguments
  and the run's arguments baked in, submitted on ``sbatch``'s standard input (requeue on
  preemption and ``--resume auto`` on restart come with the script).

The run config (with any ``--set`` overrides among the extra arguments) is validated before
anything starts or is submitted, so a typo fails here in one line rather than in the queue.
This module never imports deepspeed: it runs the launcher as a command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cot2align_ds.config import RunConfig, load_config
from cot2align_ds.errors import UserError
from cot2align_ds.run_dir import check_resumable, find_resume_tag

SBATCH_TEMPLATE = Path(__file__).resolve().parent / "launchers" / "slurm.sbatch"
_TRAIN_MODULE = ("--module", "cot2align_ds.cli", "train")


class LaunchError(UserError):
    """The launch cannot be rendered or started; one line saying what to change."""


@dataclass(frozen=True)
class LaunchPlan:
    """What ``run_launch`` will do: run ``argv`` (with ``stdin`` on its standard input), after
    writing ``hostfile_text`` to ``hostfile_path`` when there is one."""

    mode: Literal["local", "allocation", "slurm"]
    argv: list[str]
    stdin: str | None = None
    hostfile_path: Path | None = None
    hostfile_text: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # set for the launcher, over os.environ
    env_file_path: Path | None = None  # pdsh: what DeepSpeed forwards to the other nodes
    env_file_text: str | None = None

    def describe(self) -> str:
        """The dry-run text: the hostfile, the environment, the command, and the script for
        SLURM (the env file's values are not shown: only its variable names)."""
        lines = []
        if self.hostfile_path is not None:
            lines += [f"# hostfile {self.hostfile_path}", (self.hostfile_text or "").rstrip()]
        if self.env_file_path is not None:
            names = [line.split("=", 1)[0] for line in (self.env_file_text or "").splitlines()]
            lines.append(f"# env file {self.env_file_path}: {' '.join(names)}")
        lines += [f"export {key}={shlex.quote(value)}" for key, value in self.env.items()]
        lines.append(shlex.join(self.argv))
        if self.stdin is not None:
            lines += ["# batch script (on sbatch's standard input):", self.stdin.rstrip()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# SLURM node lists
# ---------------------------------------------------------------------------------------------


def expand_nodelist(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """Host names of a SLURM node list such as ``gpu[01-03,07],login1``.

    ``scontrol show hostnames`` when it is on PATH (it knows every syntax SLURM accepts),
    otherwise a small expander for comma-separated names with bracketed ranges.
    """
    if use_scontrol and shutil.which("scontrol"):
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.split()
    hosts = [host for part in _split_top_level(nodelist) for host in _expand_one(part)]
    if not hosts:
        raise LaunchError(f"SLURM node list '{nodelist}' names no hosts")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets: ``a[1,3],b`` -> ``a[1,3]``, ``b``."""
    parts, depth, current = [], 0, ""
    for char in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part for part in [*parts, current] if part]


_BRACKET = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<ranges>[^\[\]]+)\](?P<rest>.*)$")


def _expand_one(pattern: str) -> list[str]:
    """Expand the first bracket group, then the rest recursively (``r[1-2]n[1-2]`` works)."""
    match = _BRACKET.match(pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise LaunchError(f"cannot parse SLURM node list entry '{pattern}'")
        return [pattern]
    tails = _expand_one(match["rest"]) if match["rest"] else [""]
    return [
        f"{match['prefix']}{index}{tail}" for index in _indices(match["ranges"]) for tail in tails
    ]


def _indices(ranges: str) -> list[str]:
    """``01-03,07`` -> 01 02 03 07, keeping the zero padding of the range's start."""
    indices = []
    for item in ranges.split(","):
        start, _, stop = item.partition("-")
        if not start.isdigit() or (stop and not stop.isdigit()):
            raise LaunchError(f"cannot parse SLURM node range '{item}' in '[{ranges}]'")
        width = len(start)
        last = int(stop) if stop else int(start)
        indices += [str(index).zfill(width) for index in range(int(start), last + 1)]
    return indices


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _overrides(extra_args: Sequence[str]) -> list[str]:
    """The ``--set`` / ``-s`` values among the arguments passed through to ``train``."""
    overrides = []
    for index, arg in enumerate(extra_args):
        if arg in ("--config", "-c") or arg.startswith("--config="):
            raise LaunchError("give the config once, as the first argument, not in the extra args")
        if arg.startswith("--set="):
            overrides.append(arg.removeprefix("--set="))
        elif arg in ("--set", "-s"):
            if index + 1 == len(extra_args):
                raise LaunchError(f"{arg} needs a value: section.key=value")
            overrides.append(extra_args[index + 1])
    return overrides


def _resume_arg(extra_args: Sequence[str]) -> str | None:
    """The ``--resume`` value among the arguments passed through to ``train``."""
    for index, arg in enumerate(extra_args):
        if arg.startswith("--resume="):
            return arg.removeprefix("--resume=")
        if arg == "--resume":
            if index + 1 == len(extra_args):
                raise LaunchError("--resume needs a value: auto or a checkpoint tag")
            return extra_args[index + 1]
    return None


def check_resume(run: RunConfig, resume: str | None, world_size: int | None) -> None:
    """Refuse a resume that ``train`` would refuse, before any rank starts: otherwise every rank
    fails at start-up and the launcher adds its own failure report to the one line. Without a
    known world size only the checkpoint's existence and the batch layout are checked."""
    if resume is None:
        return
    output_dir = Path(run.output_dir)
    tag = find_resume_tag(output_dir, resume)
    if tag is None:
        return
    layout = {"micro_batch_size": run.train.micro_batch_size, "grad_accum": run.train.grad_accum}
    if world_size is not None:
        layout["world_size"] = world_size
    check_resumable(output_dir, tag, layout)


def _master_port(env: Mapping[str, str]) -> str:
    """MASTER_PORT if set; else derived from the SLURM job id (as the batch script does, so
    every node agrees); else a free local port."""
    if env.get("MASTER_PORT"):
        return env["MASTER_PORT"]
    if env.get("SLURM_JOB_ID", "").isdigit():
        return str(20000 + int(env["SLURM_JOB_ID"]) % 40000)
    with socket.socket() as sock:
        sock.bind(("", 0))
        return str(sock.getsockname()[1])


def _deepspeed() -> list[str]:
    # The launcher module of this interpreter: no dependence on PATH or on the `deepspeed` script.
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def _train_args(config_path: str, extra_args: Sequence[str]) -> list[str]:
    return [*_TRAIN_MODULE, "--config", str(config_path), *extra_args]


def _render_local(
    config_path: str, gpus_per_node: int | None, extra_args: Sequence[str], env: Mapping[str, str]
) -> LaunchPlan:
    argv = [*_deepspeed(), "--master_port", _master_port(env)]
    if gpus_per_node is not None:
        argv += ["--num_gpus", str(gpus_per_node)]
    return LaunchPlan("local", argv + _train_args(config_path, extra_args))


def _render_allocation(
    config_path: str,
    nodes: int,
    gpus_per_node: int | None,
    extra_args: Sequence[str],
    env: Mapping[str, str],
    multinode: str = "srun",
) -> LaunchPlan:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            f"--nodes {nodes} needs a SLURM allocation (no SLURM_JOB_NODELIST): run inside "
            "salloc/sbatch, or pass --slurm to submit a job"
        )
    hosts = expand_nodelist(nodelist)
    if len(hosts) < nodes:
        raise LaunchError(f"--nodes {nodes} but the allocation has {len(hosts)}: {nodelist}")
    gpus = gpus_per_node or _int_env(env, "SLURM_GPUS_ON_NODE")
    if gpus is None:
        raise LaunchError("cannot tell the GPUs per node: pass --gpus-per-node")
    hostfile_text = "".join(f"{host} slots={gpus}\n" for host in hosts[:nodes])
    job = env.get("SLURM_JOB_ID") or str(os.getpid())
    # Every node's launcher reads the hostfile in srun mode: not in a node-local /tmp.
    shared = Path.cwd() / ".cot2align"
    hostfile_path = shared / f"hostfile-{job}"
    launcher = [*_deepspeed(), "--hostfile", str(hostfile_path), "--master_addr", hosts[0]]
    launcher += ["--master_port", _master_port(env)]
    train = _train_args(config_path, extra_args)
    cpus = _int_env(env, "SLURM_CPUS_ON_NODE")
    threads = _threads_per_rank(env, cpus, gpus)
    common = {"hostfile_path": hostfile_path, "hostfile_text": hostfile_text}
    if multinode == "pdsh":
        env_file = shared / f"deepspeed_env-{job}"
        forwarded = {**env, **threads}
        return LaunchPlan(
            "allocation",
            [*launcher, *train],
            env={**threads, "DS_ENV_FILE": str(env_file)},
            env_file_path=env_file,
            env_file_text=deepspeed_env_text(forwarded),
            **common,
        )
    if multinode != "srun":
        raise LaunchError(f"--multinode must be srun or pdsh (got {multinode!r})")
    step = ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1"]
    if cpus is not None:
        step += ["--cpus-per-task", str(cpus)]
    step += ["--gpus-per-node", str(gpus), "--kill-on-bad-exit=1"]
    # The node rank is only known on the node: an inner shell puts it between the launcher's
    # options and the training command.
    count = len(launcher)
    inner = f'exec "${{@:1:{count}}}" --no_ssh --node_rank "$SLURM_NODEID" "${{@:{count + 1}}}"'
    argv = [*step, "bash", "-c", inner, "_", *launcher, *train]
    return LaunchPlan("allocation", argv, env=threads, **common)


# Variables DeepSpeed's pdsh launcher does not forward by itself but a run reads.
_FORWARDED_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "WANDB_", "TORCH_", "TRITON_")
_FORWARDED_PREFIXES += ("COT2ALIGN_",)
_FORWARDED_NAMES = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "SLURM_JOB_ID", "SLURM_JOB_NAME")
_FORWARDED_NAMES += ("SLURM_RESTART_COUNT", "SLURM_SUBMIT_DIR")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD")


def deepspeed_env_text(env: Mapping[str, str]) -> str:
    """A DeepSpeed env file (``NAME=value`` lines) of the variables a run needs on the other
    nodes; never a credential (``*KEY*``, ``*TOKEN*``, ...: those come from the shared home's
    ``wandb login`` / ``huggingface-cli login``), never a multi-line value."""
    lines = []
    for name in sorted(env):
        wanted = name.startswith(_FORWARDED_PREFIXES) or name in _FORWARDED_NAMES
        if wanted and not _SECRET.search(name) and "\n" not in env[name]:
            lines.append(f"{name}={env[name]}\n")
    return "".join(lines)


def _threads_per_rank(env: Mapping[str, str], cpus: int | None, ranks: int) -> dict[str, str]:
    """OMP_NUM_THREADS for each rank: the node's CPUs shared by its ranks (unless set)."""
    if env.get("OMP_NUM_THREADS") or cpus is None:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cpus // ranks))}


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def render_sbatch_script(
    template: str,
    config_path: str,
    extra_args: Sequence[str],
    directives: Mapping[str, str | None],
) -> str:
    """The batch script: ``template`` with its ``#SBATCH --key=value`` lines set from
    ``directives`` (None leaves the template's line) and the run's arguments baked in as
    positional parameters (so a requeued job re-runs with the same arguments)."""
    lines = template.splitlines()
    header_end = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    for key, value in directives.items():
        if value is None:
            continue
        wanted = f"#SBATCH --{key}={value}"
        found = [i for i, line in enumerate(lines) if re.match(rf"#SBATCH --{key}(=|\s|$)", line)]
        if found:
            lines[found[0]] = wanted
        else:
            header_end += 1
            lines.insert(header_end, wanted)
    arguments = shlex.join([str(config_path), *extra_args])
    baked = [
        "# Rendered by `cot2align launch --slurm`: the run's arguments.",
        f"set -- {arguments}",
    ]
    lines[header_end + 1 : header_end + 1] = baked
    return "\n".join(lines) + "\n"


def _render_slurm(
    config_path: str,
    nodes: int,
    gpus_per_node: int | None,
    extra_args: Sequence[str],
    directives: Mapping[str, str | None],
) -> LaunchPlan:
    if not SBATCH_TEMPLATE.is_file():
        raise LaunchError(
            f"batch script template {SBATCH_TEMPLATE} not found; reinstall the package"
        )
    template = SBATCH_TEMPLATE.read_text(encoding="utf-8")
    all_directives = {
        "nodes": str(nodes),
        "gpus-per-node": str(gpus_per_node) if gpus_per_node else None,
        **directives,
    }
    script = render_sbatch_script(template, config_path, extra_args, all_directives)
    return LaunchPlan("slurm", ["sbatch"], stdin=script)


def render_launch(
    config_path: str | Path,
    *,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    slurm: bool = False,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    partition: str | None = None,
    time: str | None = None,
    job_name: str | None = None,
    multinode: str = "srun",
) -> LaunchPlan:
    """Validate the run config (with the ``--set`` overrides in ``extra_args``) and render the
    launch. ``env`` is where SLURM variables and MASTER_PORT are read (default: os.environ);
    ``gpus_per_node=None`` means every detected GPU (locally) or the script's default (SLURM)."""
    env = os.environ if env is None else env
    if nodes < 1 or (gpus_per_node is not None and gpus_per_node < 1):
        raise LaunchError(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be >= 1")
    if not slurm and (partition or time or job_name):
        raise LaunchError("--partition, --time and --job-name apply to --slurm submissions only")
    extra_args = list(extra_args)
    run = load_config(config_path, _overrides(extra_args))
    config_path = str(config_path)
    if slurm and not run.train.save_every:
        # A SLURM job is requeued at its time limit or a preemption: without periodic
        # checkpoints, a crash or a hard kill between notices loses every step since the start.
        raise LaunchError(
            "--slurm: the run saves no periodic checkpoints; set train.save_every (e.g. "
            "--set train.save_every=200) so a requeued job resumes where it stopped"
        )
    gpus = gpus_per_node or (None if slurm else _int_env(env, "SLURM_GPUS_ON_NODE"))
    check_resume(run, _resume_arg(extra_args), nodes * gpus if gpus else None)
    if slurm:
        directives = {"partition": partition, "time": time, "job-name": job_name}
        return _render_slurm(config_path, nodes, gpus_per_node, extra_args, directives)
    if nodes > 1:
        return _render_allocation(config_path, nodes, gpus_per_node, extra_args, env, multinode)
    return _render_local(config_path, gpus_per_node, extra_args, env)


def run_launch(
    config_path: str | Path,
    *,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    slurm: bool = False,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    partition: str | None = None,
    time: str | None = None,
    job_name: str | None = None,
    multinode: str = "srun",
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """``cot2align launch``: render, then print (``dry_run``) or run / submit. Returns the exit
    code of the launcher (or of ``sbatch``); output streams straight to this terminal."""
    plan = render_launch(
        config_path,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        slurm=slurm,
        extra_args=extra_args,
        env=env,
        partition=partition,
        time=time,
        job_name=job_name,
        multinode=multinode,
    )
    if dry_run:
        echo(plan.describe())
        return 0
    if plan.mode == "slurm" and shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found on PATH: submit from a SLURM login node, or --dry-run")
    written = []
    if plan.hostfile_path is not None:
        plan.hostfile_path.parent.mkdir(parents=True, exist_ok=True)
        plan.hostfile_path.write_text(plan.hostfile_text or "", encoding="utf-8")
        written.append(plan.hostfile_path)
    if plan.env_file_path is not None:
        # Private: it may carry paths and project names a teammate need not see.
        fd = os.open(plan.env_file_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(plan.env_file_text or "")
        written.append(plan.env_file_path)
    echo(shlex.join(plan.argv))
    child_env = {**(os.environ if env is None else env), **plan.env}
    try:
        return subprocess.run(plan.argv, input=plan.stdin, text=True, env=child_env).returncode
    finally:
        for path in written:
            path.unlink(missing_ok=True)
