"""Launch scripts for a 2-worker example: their --dry-run commands (worker list, coordinator address and port,
process ids, environment, workdir, resume), and real runs against stand-ins for gcloud / scontrol / srun /
nvidia-smi / the trainer, whose recorded environment must be what `multihost.initialize_distributed` reads."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from geoalign_jax.parallel import multihost

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [".venv/bin/python", "-m", "geoalign_jax.train", "--config", "configs/demo.py"]

# gcloud stand-in: state in $FAKE_TPU_STATE_FILE ("absent" = no such TPU); every call logged to $FAKE_GCLOUD_LOG.
# create -> READY, delete -> absent; the first train command "fails" as a preemption would (state PREEMPTED).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_GCLOUD_LOG"
state="$(cat "$FAKE_TPU_STATE_FILE")"
case "$*" in
  *" describe "*networkEndpoints*) [ "$state" = READY ] || exit 1; echo "10.130.0.2;10.130.0.3" ;;
  *" describe "*) [ "$state" != absent ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }
                 [ "$state" != no-project ] || { echo "ERROR: (gcloud) The required property [project] is not currently set." >&2; exit 1; }
                 echo "$state" ;;
  *" create "*) echo READY > "$FAKE_TPU_STATE_FILE" ;;
  *" delete "*) echo absent > "$FAKE_TPU_STATE_FILE" ;;
  *geoalign_jax.train*)
    echo x >> "$FAKE_TPU_STATE_FILE.trains"
    if [ "$(wc -l < "$FAKE_TPU_STATE_FILE.trains")" -eq 1 ]; then echo PREEMPTED > "$FAKE_TPU_STATE_FILE"; exit 255; fi ;;
esac
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2 $3" = "show hostnames gpu-node[07-08]" ] || { echo "unexpected: $*" >&2; exit 1; }
printf 'gpu-node07\ngpu-node08\n'
"""
# srun stand-in: runs the task command once per task, as srun does on each node, with that task's SLURM_PROCID.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit $?; done
"""
FAKE_NVIDIA_SMI = "#!/usr/bin/env bash\nprintf '0, NVIDIA H100 80GB HBM3\\n1, NVIDIA H100 80GB HBM3\\n'\n"
# The trainer stand-in records its arguments and the distributed environment it was started with.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
keep = ("JAX_", "GEOALIGN_", "CUDA_VISIBLE_DEVICES")
record = {{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items() if k.startswith(keep)}}}}
with open(os.environ["FAKE_TRAIN_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


def _tools(tmp_path: pathlib.Path) -> dict[str, str]:
    """A PATH with the stand-ins first, and the files they record to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN),
                       ("nvidia-smi", FAKE_NVIDIA_SMI), ("fake-python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "tpu_state").write_text("absent\n")
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "JAX_", "GEOALIGN_"))}
    return {**environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
            "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"), "FAKE_TPU_STATE_FILE": str(tmp_path / "tpu_state"),
            "FAKE_TRAIN_LOG": str(tmp_path / "train.log"), "GEOALIGN_PYTHON": str(bin_dir / "fake-python")}


def _run(script: str, args: list[str], env: dict[str, str], cwd: pathlib.Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "launch" / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _commands(output: str) -> list[list[str]]:
    """The printed commands (not the '#' notes), as argument lists."""
    return [shlex.split(line) for line in output.splitlines() if line.strip() and not line.startswith("#")]


def _remote(command: list[str]) -> list[str]:
    """The words of the --command=... that a `gcloud ... ssh` runs on the workers."""
    (remote,) = [arg.removeprefix("--command=") for arg in command if arg.startswith("--command=")]
    return shlex.split(remote)


def _train_log(env: dict[str, str]) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(env["FAKE_TRAIN_LOG"]).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# TPU pod

TPU_ARGS = ["--name", "geo-pod", "--zone", "us-central2-b", "--accelerator-type", "v4-16", "--config",
            "configs/demo.py", "--workdir", "gs://bucket/runs/r1", "--project", "proj"]
SCOPE = ["--zone=us-central2-b", "--project=proj"]


def _tpu_dry_run(tmp_path, state: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    env = _tools(tmp_path)
    (tmp_path / "tpu_state").write_text(state + "\n")
    result = _run("tpu_pod.sh", [*TPU_ARGS, *extra, "--dry-run", "--", "--config.train.steps=7"], env)
    assert result.returncode == 0, result.stderr
    calls = pathlib.Path(env["FAKE_GCLOUD_LOG"]).read_text().splitlines()
    assert calls and all(" describe " in call for call in calls), calls  # a dry run changes nothing
    return result, _commands(result.stdout)


def _check_worker_commands(commands: list[list[str]]) -> None:
    ssh = [command for command in commands if command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
           and command[4] in ("ssh", "scp")]
    assert [command[4] for command in ssh] == ["scp", "ssh", "ssh", "ssh"]  # code, unpack, setup, train
    assert all("--worker=all" in command and SCOPE[0] in command for command in ssh)
    assert ssh[0][5].endswith("/geoalign-code-geo-pod.tgz") and ssh[0][6] == "geo-pod:geoalign-code.tgz"
    assert all(command[5] == "geo-pod" for command in ssh[1:])
    assert "GEOALIGN_EXTRAS=tpu" in _remote(ssh[2]) and "tools/setup_env.sh" in _remote(ssh[2])
    train = _remote(ssh[3])
    assert train[:3] == ["cd", "geoalign-jax", "&&"]
    assert train[3:] == ["GEOALIGN_DISTRIBUTED=require", *TRAIN, "--workdir", "gs://bucket/runs/r1",
                         "--config.train.steps=7"]


def test_tpu_dry_run_creates_an_absent_tpu_and_runs_one_command_on_all_workers(tmp_path):
    result, commands = _tpu_dry_run(tmp_path, "absent", "--spot")
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "geo-pod", *SCOPE,
                           "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base", "--spot"]
    assert commands[1][:2] == ["bash", "-c"] and "git ls-files" in commands[1][2]  # the code archive
    _check_worker_commands(commands)
    assert "# TPU VM geo-pod: absent" in result.stdout


def test_tpu_dry_run_reuses_a_ready_tpu_and_lists_its_workers(tmp_path):
    result, commands = _tpu_dry_run(tmp_path, "READY")
    assert not any(word in command for command in commands for word in ("create", "delete"))
    assert "# workers: 10.130.0.2 10.130.0.3" in result.stdout
    _check_worker_commands(commands)  # the same train command: the trainer resumes from the workdir


def test_tpu_dry_run_recreates_a_preempted_queued_resource(tmp_path):
    result, commands = _tpu_dry_run(tmp_path, "SUSPENDED", "--queued")
    assert commands[:2] == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "geo-pod", *SCOPE, "--force", "--quiet"],
        ["gcloud", "compute", "tpus", "queued-resources", "create", "geo-pod", "--node-id=geo-pod", *SCOPE,
         "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base"],
    ]
    _check_worker_commands(commands)
    assert "(the run resumes from gs://bucket/runs/r1)" in result.stdout


def test_tpu_run_restarts_after_a_preemption_with_the_same_command(tmp_path):
    env = _tools(tmp_path)
    result = _run("tpu_pod.sh", [*TPU_ARGS, "--max-restarts", "1"], env)
    assert result.returncode == 0, result.stderr
    calls = [call for call in pathlib.Path(env["FAKE_GCLOUD_LOG"]).read_text().splitlines() if " describe " not in call]
    kinds = [call.split()[3] for call in calls]
    assert kinds == ["create", "scp", "ssh", "ssh", "ssh",  # first attempt, preempted during training
                     "delete", "create", "scp", "ssh", "ssh", "ssh"]
    trains = [call for call in calls if "geoalign_jax.train" in call]
    assert len(trains) == 2 and trains[0] == trains[1]
    assert "restart 1 of 1" in result.stdout
    assert (tmp_path / "geoalign-code-geo-pod.tgz").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/local/runs"], "--workdir must be a gs:// bucket path"),
    (["--config", "configs/nope.py"], "--config configs/nope.py not found"),
    (["--code", "git"], "--repo is required"),
])
def test_tpu_refuses_bad_options(tmp_path, args, message):
    result = _run("tpu_pod.sh", [*TPU_ARGS, *args, "--dry-run"], _tools(tmp_path))
    assert result.returncode == 2 and message in result.stderr


# ---------------------------------------------------------------------------------------------------------
# One GPU node


def test_gpu_node_dry_run_and_run_use_every_local_gpu_in_one_process(tmp_path):
    env = _tools(tmp_path)
    args = ["--config", "configs/demo.py", "--workdir", "runs/n1", "--", "--config.train.steps=7"]
    dry = _run("gpu_node.sh", [*args[:4], "--gpus", "0,1", "--dry-run", *args[4:]], env)
    assert dry.returncode == 0, dry.stderr
    assert "GPUs on" in dry.stdout and ": 2" in dry.stdout and "#   1, NVIDIA H100 80GB HBM3" in dry.stdout
    commands = _commands(dry.stdout)
    assert commands[0] == ["env", "GEOALIGN_EXTRAS=gpu", "bash", "tools/setup_env.sh", "runtime"]
    assert commands[1] == ["env", "GEOALIGN_DISTRIBUTED=off", "CUDA_VISIBLE_DEVICES=0,1", env["GEOALIGN_PYTHON"],
                           *TRAIN[1:], "--workdir", "runs/n1", "--config.train.steps=7"]
    assert not pathlib.Path(env["FAKE_TRAIN_LOG"]).exists()

    done = _run("gpu_node.sh", [*args[:4], "--no-setup", *args[4:]], env)
    assert done.returncode == 0, done.stderr
    (record,) = _train_log(env)
    assert record["argv"] == [*TRAIN[1:], "--workdir", "runs/n1", "--config.train.steps=7"]
    assert record["env"] == {"GEOALIGN_DISTRIBUTED": "off", "GEOALIGN_PYTHON": env["GEOALIGN_PYTHON"]}


# ---------------------------------------------------------------------------------------------------------
# SLURM, two nodes

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node[07-08]", "SLURM_NTASKS": "2",
             "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
COORDINATOR = f"gpu-node07:{61440 + 4242 % 4096}"  # as jax's own SLURM detection picks the port


def test_slurm_dry_run_coordinator_process_ids_and_workdir(tmp_path):
    env = {**_tools(tmp_path), **SLURM_ENV}
    # run from elsewhere, as sbatch runs its spool copy of the script: the checkout comes from SLURM_SUBMIT_DIR
    result = _run("gpu_slurm.sbatch", ["--config", "configs/demo.py", "--workdir", "/shared/runs/s1", "--dry-run",
                                       "--", "--config.train.steps=7"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"# job 4242: 2 nodes (gpu-node07 gpu-node08), 2 tasks, coordinator {COORDINATOR}" in result.stdout
    commands = _commands(result.stdout)
    assert commands[0] == ["env", "GEOALIGN_EXTRAS=gpu", "bash", "tools/setup_env.sh", "runtime"]
    srun = commands[1]
    assert srun[:5] == ["env", f"JAX_COORDINATOR_ADDRESS={COORDINATOR}", "JAX_NUM_PROCESSES=2",
                        "GEOALIGN_DISTRIBUTED=require", "srun"]
    assert srun[-7:] == [*TRAIN[1:], "--workdir", "/shared/runs/s1", "--config.train.steps=7"]
    tasks = [line for line in result.stdout.splitlines() if line.startswith("# task ")]
    assert [line.split(":")[0] for line in tasks] == ["# task 0 on gpu-node07", "# task 1 on gpu-node08"]
    assert ["JAX_PROCESS_ID=0" in tasks[0], "JAX_PROCESS_ID=1" in tasks[1]] == [True, True]
    assert not pathlib.Path(env["FAKE_TRAIN_LOG"]).exists()


def test_slurm_tasks_get_the_environment_initialize_distributed_reads(tmp_path):
    env = {**_tools(tmp_path), **SLURM_ENV}
    result = _run("gpu_slurm.sbatch", ["--config", "configs/demo.py", "--workdir", "/shared/runs/s1", "--no-setup",
                                       "--port", "12345"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = _train_log(env)
    assert [record["argv"] for record in records] == [[*TRAIN[1:], "--workdir", "/shared/runs/s1"]] * 2
    for process_id, record in enumerate(records):
        assert record["env"][multihost.MODE_ENV] == "require"
        config = multihost.resolve_distributed_config(environ=record["env"])
        assert (config.coordinator_address, config.num_processes, config.process_id) == \
            ("gpu-node07:12345", 2, process_id)


def test_slurm_outside_a_job_says_to_use_sbatch_and_dry_runs_with_a_host_list_without_scontrol(tmp_path):
    env = {**_tools(tmp_path), "GEOALIGN_ROOT": str(REPO_ROOT)}
    result = _run("gpu_slurm.sbatch", ["--config", "configs/demo.py", "--workdir", "w"], env, cwd=tmp_path)
    assert result.returncode == 2 and "SLURM_JOB_ID is not set: submit this script with sbatch" in result.stderr
    result = _run("gpu_slurm.sbatch", ["--config", "configs/demo.py", "--workdir", "w", "--dry-run"], env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --dry-run outside a SLURM job needs --hosts H1,H2,... (the job's nodes)\n"
    (tmp_path / "bin" / "scontrol").unlink()
    result = _run("gpu_slurm.sbatch", ["--config", "configs/demo.py", "--workdir", "w", "--dry-run", "--hosts", "a1,a2"],
                  env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# job 0: 2 nodes (a1 a2), 2 tasks, coordinator a1:61440" in result.stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("# task ")] == \
        ["# task 0 on a1", "# task 1 on a2"]


def test_tpu_dry_run_shows_gclouds_own_error_when_it_cannot_describe_the_tpu(tmp_path):
    env = _tools(tmp_path)
    (tmp_path / "tpu_state").write_text("no-project\n")
    result = _run("tpu_pod.sh", [*TPU_ARGS, "--dry-run"], env)
    assert result.returncode == 2 and not _commands(result.stdout)  # plans nothing, creates nothing
    assert "gcloud cannot describe TPU VM geo-pod (exit status 1): ERROR: (gcloud) The required property [project] is not currently set." in result.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_node.sh", "gpu_slurm.sbatch"])
def test_help_is_the_header_and_names_the_dry_run(tmp_path, script):
    result = _run(script, ["--help"], _tools(tmp_path))  # from the repository root, as the docs say
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Train on ") and "--dry-run" in result.stdout and "#SBATCH" not in result.stdout
    assert "set -euo pipefail" not in result.stdout
