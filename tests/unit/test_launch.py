"""Launch scripts and ``render_launch``: syntax, rendered commands, and the batch script run for
real against stub ``scontrol`` / ``srun`` / ``deepspeed`` / ``sbatch`` executables."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cot2align_ds.config import ConfigError
from cot2align_ds.launch import (
    SBATCH_TEMPLATE,
    LaunchError,
    expand_nodelist,
    render_launch,
    render_sbatch_script,
    run_launch,
)

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((ROOT / "launchers").iterdir())
LOCAL_SH = ROOT / "launchers" / "local.sh"
DEEPSPEED_RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]
TRAIN = ["--module", "cot2align_ds.cli", "train"]

# Each stub appends one line per call to $STUB_LOG: its name, then every argument in brackets.
_RECORD = 'echo "$(basename "$0")$(printf " [%s]" "$@")" >> "$STUB_LOG"\n'
STUBS = {
    "scontrol": _RECORD
    + 'if [[ "$1" == show ]]; then printf "%s\\n" node01 node02 node03 | head -n "$STUB_NODES"; fi\n',
    # deepspeed: keep a copy of the hostfile; with STUB_WAIT, run until the ranks are notified
    # (a pkill or pdsh call is recorded), then exit with STUB_STATUS as the checkpointed ranks do.
    "deepspeed": _RECORD
    + 'for ((i = 1; i < $#; i++)); do [[ "${!i}" == --hostfile ]] && j=$((i + 1)) && '
    + 'cp "${!j}" "$STUB_LOG.hostfile"; done\n'
    + 'echo "$OMP_NUM_THREADS" > "$STUB_LOG.omp"\n'
    + '[[ -z "${DS_ENV_FILE:-}" ]] || cp -p "$DS_ENV_FILE" "$STUB_LOG.envfile"\n'
    + "for ((t = 0; t < 400 && ${STUB_WAIT:-0}; t++)); do "
    + 'grep -qE "^(pkill|pdsh) " "$STUB_LOG" && exit "${STUB_STATUS:-75}"; sleep 0.05; done\n'
    + 'exit "${STUB_EXIT:-0}"\n',
    "pkill": _RECORD,
    "recorder": _RECORD,
    "pdsh": _RECORD,
    # srun: drop its own options, then run the command once per node as SLURM would.
    "srun": _RECORD
    + 'while [[ "$1" == --* ]]; do [[ "$1" == *=* || "$1" == --overlap ]] && shift || shift 2; done\n'
    + 'for ((n = 0; n < STUB_NODES; n++)); do SLURM_NODEID=$n "$@" || exit; done\n',
    "sbatch": _RECORD + 'cat > "$STUB_LOG.script"; echo "Submitted batch job 99"\n',
}


@pytest.fixture()
def stubs(tmp_path) -> dict[str, str]:
    """An environment whose PATH starts with the stubs, plus a SLURM job on three nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_")) and k not in ("OMP_NUM_THREADS", "DS_ENV_FILE")
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        STUB_LOG=str(tmp_path / "calls.log"),
        STUB_NODES="3",
        SLURM_JOB_ID="4321",
        SLURM_JOB_NODELIST="node[01-03]",
        SLURM_SUBMIT_DIR=str(submit),
        GPUS_PER_NODE="4",
    )
    return env


def _calls(env: dict[str, str], name: str) -> list[list[str]]:
    log = Path(env["STUB_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split(" ", 1)[1][1:-1].split("] [") for line in lines if line.startswith(name)]


def _sbatch(env: dict[str, str], *args: str, script: Path | None = None):
    command = ["bash", str(script or SBATCH_TEMPLATE), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


# -- the scripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
def test_launchers_parse_and_are_executable(launcher):
    result = subprocess.run(["bash", "-n", str(launcher)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(launcher, os.X_OK)
    assert "set -euo pipefail" in launcher.read_text()


def test_local_sh_passes_config_and_arguments_through(stubs):
    env = {**stubs, "GPUS": "2", "MASTER_PORT": "29111"}
    args = ["my run.yaml", "--set", "train.lr=1e-4", "--overwrite"]
    result = subprocess.run(["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [call] = _calls(stubs, "deepspeed")
    expected = ["--master_port", "29111", "--num_gpus", "2", *TRAIN, "--config", "my run.yaml"]
    assert call == expected + args[1:]


def test_local_sh_without_gpus_lets_deepspeed_detect_and_picks_a_free_port(stubs):
    result = subprocess.run(["bash", str(LOCAL_SH), "cfg.yaml"], env=stubs, capture_output=True)
    assert result.returncode == 0
    [call] = _calls(stubs, "deepspeed")
    assert call[0] == "--master_port" and call[1].isdigit() and "--num_gpus" not in call


def test_local_sh_needs_a_config(stubs):
    result = subprocess.run(["bash", str(LOCAL_SH), "--set", "x=1"], env=stubs, capture_output=True)
    assert result.returncode == 2 and b"usage" in result.stderr
    assert _calls(stubs, "deepspeed") == []


def test_sbatch_header_requeues_and_signals_the_batch_shell():
    header = [
        line for line in SBATCH_TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH")
    ]
    assert "#SBATCH --requeue" in header
    assert "#SBATCH --signal=B:USR1@300" in header
    assert "#SBATCH --open-mode=append" in header  # a restart appends to the same log


def test_sbatch_multinode_pdsh_one_launcher_with_hostfile(stubs):
    result = _sbatch({**stubs, "DS_MULTINODE": "pdsh"}, "cfg.yaml", "--set", "train.lr=1e-4")
    assert result.returncode == 0, result.stderr
    [call] = _calls(stubs, "deepspeed")  # one launcher for the whole job
    hostfile = str(Path(stubs["SLURM_SUBMIT_DIR"]) / ".cot2align" / "hostfile-4321")
    port = str(20000 + 4321 % 40000)
    assert call == [
        "--hostfile", hostfile, "--master_addr", "node01", "--master_port", port,
        *TRAIN, "--config", "cfg.yaml", "--set", "train.lr=1e-4",
    ]  # fmt: skip
    written = Path(stubs["STUB_LOG"] + ".hostfile").read_text()
    assert written == "node01 slots=4\nnode02 slots=4\nnode03 slots=4\n"
    assert not Path(hostfile).exists()  # removed when the job ends


def test_sbatch_multinode_srun_one_launcher_per_node_with_node_rank(stubs):
    # srun is the default; the step asks for the node's CPUs and GPUs (not inherited since
    # Slurm 22.05), and each rank gets its share of the CPUs as OpenMP threads.
    stubs["SLURM_CPUS_ON_NODE"] = "32"
    result = _sbatch(stubs, "cfg.yaml", "--set", "a.b=two words")
    assert result.returncode == 0, result.stderr
    [srun] = _calls(stubs, "srun")
    assert srun[:10] == [
        "--nodes", "3", "--ntasks-per-node", "1", "--cpus-per-task", "32", "--gpus-per-node", "4",
        "--kill-on-bad-exit=1", "bash",
    ]  # fmt: skip
    calls = _calls(stubs, "deepspeed")
    assert [call[:3] for call in calls] == [["--no_ssh", "--node_rank", str(n)] for n in range(3)]
    assert all(call[-2:] == ["--set", "a.b=two words"] for call in calls)
    assert all(call[call.index("--master_addr") + 1] == "node01" for call in calls)
    assert Path(stubs["STUB_LOG"] + ".omp").read_text().strip() == "8"  # 32 CPUs / 4 ranks
    assert not Path(stubs["STUB_LOG"] + ".envfile").exists()  # srun passes the environment


def test_sbatch_pdsh_mode_forwards_the_environment_but_no_secrets(stubs):
    env = {
        **stubs, "DS_MULTINODE": "pdsh", "SLURM_RESTART_COUNT": "1", "SLURM_CPUS_ON_NODE": "16",
        "HF_HOME": "/shared/hf cache", "HF_HUB_OFFLINE": "1", "WANDB_PROJECT": "distill",
        "WANDB_API_KEY": "secret-1", "HF_TOKEN": "secret-2", "UNRELATED": "x",
    }  # fmt: skip
    result = _sbatch(env, "cfg.yaml")
    assert result.returncode == 0, result.stderr
    copy = Path(stubs["STUB_LOG"] + ".envfile")
    lines = copy.read_text().splitlines()
    for expected in ["HF_HOME=/shared/hf cache", "HF_HUB_OFFLINE=1", "WANDB_PROJECT=distill",
                     "SLURM_RESTART_COUNT=1", "SLURM_JOB_ID=4321", "OMP_NUM_THREADS=4"]:  # fmt: skip
        assert expected in lines
    assert "secret" not in copy.read_text() and not any(
        line.startswith("UNRELATED") for line in lines
    )
    assert copy.stat().st_mode & 0o077 == 0  # private to the user
    assert not list((Path(stubs["SLURM_SUBMIT_DIR"]) / ".cot2align").glob("deepspeed_env-*"))


def test_sbatch_single_node_uses_num_gpus_and_no_hostfile(stubs):
    result = _sbatch({**stubs, "STUB_NODES": "1", "SLURM_JOB_NODELIST": "node01"}, "cfg.yaml")
    assert result.returncode == 0, result.stderr
    [call] = _calls(stubs, "deepspeed")
    assert call[:4] == ["--num_gpus", "4", "--master_port", "24321"] and "--hostfile" not in call


def test_sbatch_restart_adds_resume_auto_once(stubs):
    stubs["DS_MULTINODE"] = "pdsh"  # one launcher call per job
    first = _sbatch(stubs, "cfg.yaml")
    restarted = _sbatch({**stubs, "SLURM_RESTART_COUNT": "1"}, "cfg.yaml")
    chosen = _sbatch({**stubs, "SLURM_RESTART_COUNT": "2"}, "cfg.yaml", "--resume", "latest")
    assert first.returncode == restarted.returncode == chosen.returncode == 0
    calls = _calls(stubs, "deepspeed")
    assert "--resume" not in calls[0]
    assert calls[1][-2:] == ["--resume", "auto"]
    assert calls[2][-2:] == ["--resume", "latest"] and calls[2].count("--resume") == 1


@pytest.mark.parametrize(("nodes", "mode", "notifier"), [("3", "pdsh", "pdsh"), ("1", "pdsh", "pkill"), ("3", "srun", "srun")])  # fmt: skip
def test_sbatch_usr1_notifies_the_ranks_and_requeues_on_their_checkpoint(
    stubs, nodes, mode, notifier
):
    env = {**stubs, "STUB_WAIT": "1", "DS_MULTINODE": mode, "STUB_NODES": nodes}
    if nodes == "1":
        env["SLURM_JOB_NODELIST"] = "node01"
    process = subprocess.Popen(["bash", str(SBATCH_TEMPLATE), "cfg.yaml"], env=env, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _calls(stubs, "deepspeed") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _calls(stubs, "scontrol").count(["requeue", "4321"]) == 0  # not before the ranks
        process.send_signal(signal.SIGUSR1)
        process.send_signal(signal.SIGUSR1)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    notices = (
        _calls(stubs, notifier)
        if notifier != "srun"
        else [call for call in _calls(stubs, "srun") if "pkill" in call]
    )
    assert len(notices) == 1 and "cot2align_ds[.]cli.*--local_rank=" in " ".join(notices[0])
    assert _calls(stubs, "scontrol").count(["requeue", "4321"]) == 1


def test_sbatch_keeps_a_failed_launchers_status_and_does_not_requeue(stubs):
    result = _sbatch({**stubs, "DS_MULTINODE": "pdsh", "STUB_EXIT": "7"}, "cfg.yaml")
    assert result.returncode == 7
    assert ["requeue", "4321"] not in _calls(stubs, "scontrol")


def test_sbatch_outside_slurm_fails_in_one_line(stubs):
    env = {k: v for k, v in stubs.items() if not k.startswith("SLURM_")}
    result = _sbatch(env, "cfg.yaml")
    assert result.returncode != 0 and "sbatch" in result.stderr
    assert _calls(stubs, "deepspeed") == []


# -- render_launch ----------------------------------------------------------------------------------


@pytest.fixture()
def config_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "student": {"name_or_path": "s"},
                "distill": {"method": "sft"},
                "train": {"save_every": 100},
            }
        )
    )
    return path


def test_render_one_node_runs_the_deepspeed_launcher_locally(config_file):
    plan = render_launch(
        config_file,
        gpus_per_node=2,
        extra_args=["--set", "train.lr=0.1"],
        env={"MASTER_PORT": "29500"},
    )
    assert plan.mode == "local" and plan.hostfile_path is None and plan.stdin is None
    assert plan.argv == [
        *DEEPSPEED_RUNNER, "--master_port", "29500", "--num_gpus", "2",
        *TRAIN, "--config", str(config_file), "--set", "train.lr=0.1",
    ]  # fmt: skip


def test_render_two_nodes_from_a_slurm_allocation(config_file, stubs, monkeypatch, tmp_path):
    """One srun step, one deepspeed launcher per node with its node rank; the step asks for
    the node's CPUs and GPUs, each rank gets its share of the CPUs as threads."""
    monkeypatch.chdir(tmp_path)
    env = {
        "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "123", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "64",
    }  # fmt: skip
    plan = render_launch(config_file, nodes=2, env=env)
    assert plan.mode == "allocation" and plan.env == {"OMP_NUM_THREADS": "8"}
    assert plan.hostfile_path == tmp_path / ".cot2align" / "hostfile-123"  # shared, not /tmp
    assert plan.hostfile_text == "gpu07 slots=8\ngpu08 slots=8\n"
    assert plan.argv[:12] == [
        "srun", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "64",
        "--gpus-per-node", "8", "--kill-on-bad-exit=1", "bash", "-c",
    ]  # fmt: skip
    assert "gpu07 slots=8" in plan.describe() and "export OMP_NUM_THREADS=8" in plan.describe()
    # Run the step through the srun stub, with a recorder standing in for python.
    argv = list(plan.argv)
    start = argv.index("_") + 1
    assert argv[start : start + 3] == DEEPSPEED_RUNNER
    argv[start] = str(tmp_path / "bin" / "recorder")
    result = subprocess.run(argv, env={**stubs, "STUB_NODES": "2"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    launcher = [
        "-m", "deepspeed.launcher.runner", "--hostfile", str(plan.hostfile_path),
        "--master_addr", "gpu07", "--master_port", "20123",
    ]  # fmt: skip
    assert _calls(stubs, "recorder") == [
        [*launcher, "--no_ssh", "--node_rank", str(node), *TRAIN, "--config", str(config_file)]
        for node in range(2)
    ]


def test_render_two_nodes_over_pdsh_writes_the_environment_but_no_secrets(config_file):
    env = {
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123", "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_ON_NODE": "32", "HF_HOME": "/shared/hf", "WANDB_PROJECT": "p",
        "WANDB_API_KEY": "secret", "HF_TOKEN": "secret", "UNRELATED": "x",
    }  # fmt: skip
    plan = render_launch(config_file, nodes=2, env=env, multinode="pdsh")
    assert plan.argv[:3] == DEEPSPEED_RUNNER and "--no_ssh" not in plan.argv
    assert plan.env == {"OMP_NUM_THREADS": "8", "DS_ENV_FILE": str(plan.env_file_path)}
    lines = (plan.env_file_text or "").splitlines()
    assert lines == [
        "HF_HOME=/shared/hf", "OMP_NUM_THREADS=8", "SLURM_JOB_ID=123", "WANDB_PROJECT=p",
    ]  # fmt: skip
    assert "secret" not in plan.describe()
    with pytest.raises(LaunchError, match="srun or pdsh"):
        render_launch(config_file, nodes=2, env=env, multinode="ssh")


def test_render_two_nodes_without_an_allocation_fails_in_one_line(config_file):
    with pytest.raises(LaunchError, match="needs a SLURM allocation") as error:
        render_launch(config_file, nodes=2, env={})
    assert "\n" not in str(error.value)
    with pytest.raises(LaunchError, match="allocation has 1"):
        render_launch(config_file, nodes=2, gpus_per_node=8, env={"SLURM_JOB_NODELIST": "a1"})


def test_render_slurm_script_sets_the_header_and_bakes_the_arguments(config_file):
    args = ["--set", "train.lr=1e-4", "--set", "tracking.run_name=two words"]
    plan = render_launch(
        config_file, nodes=2, gpus_per_node=4, slurm=True, extra_args=args, env={},
        partition="gpu", time="12:00:00", job_name="paperA",
    )  # fmt: skip
    assert plan.mode == "slurm" and plan.argv == ["sbatch"]
    header = [line for line in plan.stdin.splitlines() if line.startswith("#SBATCH")]
    for line in ("--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=12:00:00"):
        assert f"#SBATCH {line}" in header
    assert "#SBATCH --job-name=paperA" in header and "#SBATCH --job-name=cot2align" not in header
    assert "#SBATCH --requeue" in header
    assert f"set -- {shlex.join([str(config_file), *args])}" in plan.stdin


def test_rendered_slurm_script_runs_with_its_baked_arguments(config_file, stubs, tmp_path):
    plan = render_launch(config_file, nodes=3, slurm=True, extra_args=["--overwrite"], env={})
    script = tmp_path / "rendered.sbatch"
    script.write_text(plan.stdin)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = _sbatch({**stubs, "DS_MULTINODE": "pdsh"}, script=script)
    assert result.returncode == 0, result.stderr
    [call] = _calls(stubs, "deepspeed")
    assert call[-3:] == ["--config", str(config_file), "--overwrite"]


def test_render_sbatch_script_inserts_missing_directives_inside_the_header():
    template = "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --requeue\necho body\n"
    script = render_sbatch_script(template, "c.yaml", [], {"nodes": "4", "account": "proj"})
    assert script.splitlines() == [
        "#!/bin/bash", "#SBATCH --nodes=4", "#SBATCH --requeue", "#SBATCH --account=proj",
        "# Rendered by `cot2align launch --slurm`: the run's arguments.", "set -- c.yaml",
        "echo body",
    ]  # fmt: skip


def test_bad_config_fails_before_anything_is_submitted(config_file, stubs, monkeypatch):
    monkeypatch.setenv("PATH", stubs["PATH"])
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        run_launch(config_file, slurm=True, extra_args=["--set", "train.lrr=1"], env=stubs)
    with pytest.raises(ConfigError, match="no such file"):
        run_launch("missing.yaml", slurm=True, env=stubs)
    assert _calls(stubs, "sbatch") == []
    assert run_launch(config_file, slurm=True, env=stubs, echo=lambda _: None) == 0
    assert len(_calls(stubs, "sbatch")) == 1
    assert "#SBATCH --requeue" in Path(stubs["STUB_LOG"] + ".script").read_text()


def test_dry_run_prints_and_runs_nothing(config_file, stubs, monkeypatch):
    monkeypatch.setenv("PATH", stubs["PATH"])
    printed: list[str] = []
    assert run_launch(config_file, slurm=True, dry_run=True, env=stubs, echo=printed.append) == 0
    assert _calls(stubs, "sbatch") == []
    assert printed[0].startswith("sbatch\n# batch script") and "set -- " in printed[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--config", "other.yaml"], "give the config once"),
        (["--set"], "--set needs a value"),
    ],
)
def test_extra_args_are_checked(config_file, args, fragment):
    with pytest.raises(LaunchError, match=fragment):
        render_launch(config_file, extra_args=args, env={})


def test_scheduler_options_need_slurm(config_file):
    with pytest.raises(LaunchError, match="--slurm submissions only"):
        render_launch(config_file, partition="gpu", env={})


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
        ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
        ("gpu-[001-002]-x", ["gpu-001-x", "gpu-002-x"]),
    ],
)
def test_expand_nodelist_without_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist, use_scontrol=False) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-", "node[a-b]", ""])
def test_expand_nodelist_rejects_what_it_cannot_parse(nodelist):
    with pytest.raises(LaunchError):
        expand_nodelist(nodelist, use_scontrol=False)


def test_a_slurm_submission_needs_periodic_checkpoints(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"student": {"name_or_path": "s"}, "distill": {"method": "sft"}})
    )
    with pytest.raises(LaunchError, match="set train.save_every"):
        render_launch(path, slurm=True)
    assert (
        render_launch(path, slurm=True, extra_args=["--set", "train.save_every=50"]).mode == "slurm"
    )


# -- the GPU check at start-up ----------------------------------------------------------------


@pytest.mark.parametrize(("env", "device", "refused"), [
    ({"SLURM_GPUS_ON_NODE": "4"}, "cpu", True),
    ({"SLURM_JOB_GPUS": "0,1"}, "cpu", True),
    ({"SLURM_GPUS_ON_NODE": "0"}, "cpu", False),  # a CPU job
    ({}, "cpu", False),  # not under SLURM
    ({"SLURM_GPUS_ON_NODE": "4"}, "cuda", False),
])  # fmt: skip
def test_a_job_given_gpus_must_be_able_to_use_them(env, device, refused):
    from cot2align_ds.engine.deepspeed_engines import NoUsableGpuError, require_usable_gpus

    if not refused:
        require_usable_gpus(env, device)
        return
    with pytest.raises(NoUsableGpuError, match="install a CUDA build of torch") as info:
        require_usable_gpus(env, device)
    assert "\n" not in str(info.value)
