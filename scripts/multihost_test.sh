#!/usr/bin/env bash
# Many hosts for real: three containers of the CPU image stand for three hosts, each running `hvd-sshd`, on two
# podman networks of their own (eth0, eth1 in each container); the launchers in the first one start the ranks
# in the others. `make multihost-test`; docker/README.md ("Testing many hosts") lists what it runs.
#
#   plain     horovodrun -np 3 -H c1:1,c2:1,c3:1 --gloo, ssh on port 22: CGBN over the 3 ranks; checks the
#             checkpoint, metrics, evaluation, and that the ranks ran on c1, c2, c3 (the trainer's start-up line)
#   nic-port  the same with -p 2222 (a second sshd) and --network-interface eth1: Gloo's bytes counted on eth1
#   mpi       the same as plain with horovodrun --mpi (OpenMPI's mpirun, its daemons started over ssh)
#   mpirun    the same with plain mpirun, no horovodrun
#   hung      rank 1 (on c2) stopped with SIGSTOP mid-run, stall_limit=90: the job ends, naming rank 1 and c2,
#             and no process is left in any container, the stopped rank included; mpi-hung: the same with --mpi
#   lost      container c2 killed mid-run: every rank gone within 60 s, rank 0 names rank 1 / c2; then
#             --resume on c1, c3 continues from the last checkpoint; mpi-lost: the same with --mpi
#   elastic   --host-discovery-script lists the containers that answer on ssh; c3 stopped mid-run: training
#             finishes on c1, c2 with the lr rescaled, and the log names the host that left
#   slurm-srun, slurm-horovodrun
#             Slurm (slurmctld in a fourth container, slurmd in c1-c3): docker/slurm/train.sbatch submitted with
#             sbatch, its ranks started by srun --mpi=pmix, or by horovodrun inside the allocation
#   slurm-scancel
#             the srun job cancelled mid-run: every process gone from c1-c3 within 30 s, the queue empty; the
#             job submitted again continues from the last checkpoint (--resume)
#
# Needs root and podman (set-up: docker/README.md, "Testing the image"); builds the image with
# scripts/build_image.sh (seconds when nothing changed). Traffic stays between the test's containers, on two
# --internal networks that it creates and removes, as it does the containers, however it ends.
#
# Environment (optional): IMAGE (default localhost/hvd_megdet:cpu-test), KEEP=1 keeps the logs (printed path),
# SCENARIOS (default: all, "plain nic_port mpi mpirun_plain hung mpi_hung lost mpi_lost elastic slurm_srun
# slurm_horovodrun slurm_scancel"): the ones to run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/hvd_megdet:cpu-test}
CLUSTER_IMAGE=localhost/hvd_megdet:cluster-test
PREFIX=hvdmh                 # containers hvdmh-c1.., networks hvdmh-a, hvdmh-b
HOSTS=(c1 c2 c3)
PORT=2222                    # the non-default ssh port of the nic-port run
STALL_LIMIT=90                # above the slowest batch seen in this test (62 s: 3 ranks on 2 cores busy with other jobs)
RUN_TIMEOUT=1800             # seconds any one horovodrun may take (a guard against hangs: a run takes 1-3 min)

say() { echo "multihost_test: $*" >&2; }
die() { say "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (rootful podman gives containers networks of their own)"
command -v podman >/dev/null || die "podman not found; see docker/README.md, \"Testing the image\""

TMP=$(mktemp -d)
remove_all() {
    podman rm -f -t 0 "${HOSTS[@]/#/$PREFIX-}" "$PREFIX-ctl" >/dev/null 2>&1 || true
    podman network rm -f "$PREFIX-a" "$PREFIX-b" >/dev/null 2>&1 || true
}
finish() {
    remove_all
    if [ "${KEEP:-0}" = 1 ]; then say "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap finish EXIT
remove_all  # leftovers of an interrupted run

IMAGE=$IMAGE "$ROOT/scripts/build_image.sh"
# The containers run the image with Debian's Slurm and munge added (docker/slurm/Dockerfile): the ssh and MPI
# scenarios use the image's own commands only; the Slurm ones start its daemons in them.
say "building $CLUSTER_IMAGE (docker/slurm/Dockerfile on $IMAGE)"
podman build --format docker --pull=never -q -f "$ROOT/docker/slurm/Dockerfile" --build-arg IMAGE="$IMAGE" \
    -t "$CLUSTER_IMAGE" "$ROOT" >/dev/null
uid=$(podman run --rm --network none "$CLUSTER_IMAGE" id -u)

# A key pair made for this test, mounted as the user's ~/.ssh in every container; a shared output folder (rank 0
# writes there; --resume and elastic workers read it) and a shared data folder.
mkdir -p "$TMP/ssh" "$TMP/share" "$TMP/data"
podman run --rm --network none -v "$TMP/ssh:/keys" --user 0 "$CLUSTER_IMAGE" bash -c \
    "ssh-keygen -q -t ed25519 -N '' -C hvd_megdet-multihost-test -f /keys/id_ed25519 && cp /keys/id_ed25519.pub /keys/authorized_keys"
chown -R "$uid:$uid" "$TMP/ssh" "$TMP/share" "$TMP/data"
chmod 700 "$TMP/ssh" && chmod 600 "$TMP/ssh"/*

podman network create --internal "$PREFIX-a" >/dev/null
podman network create --internal "$PREFIX-b" >/dev/null
ncpu=$(nproc)
start_host() {  # start_host NAME: the container for host NAME, running hvd-sshd on port 22
    local i=${1#c}
    # The alias makes the host name resolvable by the other containers (podman's DNS knows container names).
    # Port 22 for the user hvd: unprivileged ports start at 22 in this container's network namespace only.
    # The second network is connected after the start: given both at once, podman names the interfaces in no
    # fixed order (eth0 on network a in one container, on b in another), and horovodrun needs one interface
    # name that every host routes (with none it exited 1, its message lost: Horovod prints, then os._exit).
    podman run -d --name "$PREFIX-$1" --hostname "$1" --network-alias "$1" --network "$PREFIX-a" \
        --sysctl net.ipv4.ip_unprivileged_port_start=22 --cpuset-cpus $(((i - 1) % ncpu)) \
        -v "$TMP/ssh:/home/hvd/.ssh" -v "$TMP/data:/data" -v "$TMP/share:/workspace/output" \
        "$CLUSTER_IMAGE" hvd-sshd 22 >/dev/null
    podman network connect --alias "$1" "$PREFIX-b" "$PREFIX-$1"
}
for h in "${HOSTS[@]}"; do start_host "$h"; done
on() { local h=$1; shift; podman exec "$PREFIX-$h" "$@"; }  # on HOST COMMAND...: run it in that container

# The processes of jobs in a container: all but its ssh daemons and this probe, one "pid name status command" a line.
# Slurm's job step daemons (slurmstepd) are job processes; its node daemon and munge's are not.
DAEMONS='("sshd", "slurmd", "munged")'
JOBPROCS='import os, psutil
for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
    if p.info["pid"] != os.getpid() and p.info["name"] not in '"$DAEMONS"' and p.info["status"] != psutil.STATUS_ZOMBIE:
        print(p.info["pid"], p.info["name"], p.info["status"], " ".join(p.info["cmdline"] or [])[:150])'
jobprocs() { on "$1" python -c "$JOBPROCS"; }

say "generating the data set in c1"
on c1 python -m hvd_megdet.data.synthetic --out /data/shapes --num-train 24 --num-val 8 >/dev/null

# The demo config at 96-128 px, 2 images per rank; CGBN over all ranks (the demo's bn_group_size 0).
TRAIN_ARGS=(--config configs/demo_shapes.yaml solver.ims_per_gpu=2 'input.min_size=[96]' input.max_size=128
            solver.warmup_iters=1 log_period=1 checkpoint_period=2)
TRAIN=(python -m hvd_megdet.train "${TRAIN_ARGS[@]}")
# horovodrun's own default (30 s) to start its interface probe on every host was too short on 2 busy cores.
HVDRUN=(horovodrun --start-timeout 300)
# Plain mpirun as Horovod's docs give it, for Debian's OpenMPI: ranks started over ssh, no core binding (one core
# per container), the environment the ranks need passed on (-x), TCP between hosts.
MPIRUN=(mpirun --bind-to none --map-by slot
        -x PATH -x PYTHONUNBUFFERED -x NO_ALBUMENTATIONS_UPDATE -x NCCL_SOCKET_IFNAME=eth0
        -mca pml ob1 -mca btl tcp,self -mca btl_tcp_if_include eth0 -mca oob_tcp_if_include eth0)
run() {  # run NAME COMMAND...: the command in c1, in the foreground, logged
    local name=$1; shift
    say "$name: $*"
    timeout -k 10 "$RUN_TIMEOUT" podman exec "$PREFIX-c1" "$@" >"$TMP/$name.log" 2>&1 \
        || { local rc=$?; tail -40 "$TMP/$name.log" >&2; die "$name: $1 failed, exit status $rc (log above)"; }
}
launch() {  # launch NAME COMMAND...: the same in the background; sets $job
    local name=$1; shift
    say "$name: $* (background)"
    timeout -k 10 "$RUN_TIMEOUT" podman exec "$PREFIX-c1" "$@" >"$TMP/$name.log" 2>&1 &
    job=$!
}
wait_iteration() {  # wait_iteration OUTPUT N: until rank 0 has recorded iteration N
    local deadline=$((SECONDS + RUN_TIMEOUT))
    until [ -f "$TMP/share/$1/metrics.jsonl" ] && [ "$(wc -l <"$TMP/share/$1/metrics.jsonl")" -ge "$2" ]; do
        [ $SECONDS -lt $deadline ] || die "$1: no iteration $2 within $RUN_TIMEOUT s"
        kill -0 "$job" 2>/dev/null || { tail -30 "$TMP/$1.log" >&2; die "$1: the job ended before iteration $2 (log above)"; }
        sleep 0.5
    done
}
now() { date +%s.%N; }
since() { awk -v t0="$1" -v t="$(now)" 'BEGIN { printf "%.1f", t - t0 }'; }
expect() {  # expect LOG TEXT: the log holds TEXT
    grep -qF -- "$2" "$TMP/$1.log" || { tail -30 "$TMP/$1.log" >&2; die "$1: no \"$2\" in its log"; }
}
check_outputs() {  # check_outputs OUTPUT ITERATIONS WORLD: checkpoint, metrics, evaluation, config
    local dir="$TMP/share/$1" f
    printf -v f '%s/checkpoints/model_%07d.pth' "$dir" "$2"
    for f in "$f" "$dir/metrics.jsonl" "$dir/eval/latest.json" "$dir/config.yaml" "$dir/log.txt"; do
        [ -s "$f" ] || die "$1: no ${f#"$TMP/share/"}"
    done
    grep -q "\"iteration\": $2, .*\"world_size\": $3" "$dir/metrics.jsonl" \
        || die "$1: metrics.jsonl has no iteration $2 on $3 ranks"
}
hosts_of() {  # hosts_of OUTPUT: the trainer's start-up line naming every rank's host
    grep -m1 -o 'ranks on hosts: .*' "$TMP/share/$1/log.txt" || die "$1: log.txt names no hosts per rank"
}
expect_hosts() {  # expect_hosts OUTPUT HOST...: rank r ran on the r-th HOST
    local line r=0 h
    line=$(hosts_of "$1")
    for h in "${@:2}"; do
        grep -qE "(: |, )$r $h pid" <<<"$line" || die "$1: rank $r did not run on $h: $line"
        r=$((r + 1))
    done
}
traffic() {  # traffic HOST IFACE: bytes through IFACE in that container so far
    on "$1" cat "/sys/class/net/$2/statistics/rx_bytes" "/sys/class/net/$2/statistics/tx_bytes" \
        | awk '{ n += $1 } END { print n }'
}

all_gone() {  # all_gone NAME T0 LIMIT EVENT: wait until no job process is left in c1-c3, at most LIMIT s after T0
    until [ -z "$(jobprocs c1)$(jobprocs c2)$(jobprocs c3)" ]; do
        [ "$(since "$2" | cut -d. -f1)" -lt "$3" ] \
            || die "$1: processes left $3 s after $4: c1: $(jobprocs c1) c2: $(jobprocs c2) c3: $(jobprocs c3)"
        sleep 0.5
    done
}
note() {  # a line of the summary printed at the end, without the launchers' "[0]<stderr>:", "[1,0]<stdout>:" tags
    sed -E 's/\[[0-9,]+\]<std(out|err)>://g' <<<"$*" >>"$TMP/notes"
}

three_hosts() {  # three_hosts NAME LAUNCHER...: 4 iterations with one rank on each of c1, c2, c3, and checks
    local name=$1 start=$SECONDS
    shift
    run "$name" "$@" -np 3 -H c1:1,c2:1,c3:1 "${TRAIN[@]}" output_dir=output/$name solver.max_iter=4 'solver.steps=[3]'
    check_outputs "$name" 4 3
    expect_hosts "$name" c1 c2 c3
    expect "$name" "norm=cgbn bn_group_size=0"
    note "$name: $((SECONDS - start)) s; $(hosts_of "$name")"
}
plain() { three_hosts plain "${HVDRUN[@]}" --gloo; }  # horovodrun over ssh on port 22, the interface it finds
# Open MPI 4's TCP transport can hang at start-up when it pairs several interfaces (eth0 and eth1 here: one job of
# ten, in Horovod's first allreduce), so the MPI runs name one, as docker/README.md tells users to.
MPI_OPTIONS=(--mpi --network-interface eth0)
mpi() { three_hosts mpi "${HVDRUN[@]}" "${MPI_OPTIONS[@]}"; }  # horovodrun's mpirun: its daemons started over ssh
mpirun_plain() { three_hosts mpirun "${MPIRUN[@]}"; }  # plain mpirun, no horovodrun

nic_port() {  # a second sshd on port 2222 in each container; Gloo told to use eth1
    local start=$SECONDS before0 before1 eth0 eth1
    for h in "${HOSTS[@]}"; do on "$h" bash -c "nohup hvd-sshd $PORT >/tmp/sshd-$PORT.log 2>&1 &"; done
    before0=$(traffic c2 eth0) before1=$(traffic c2 eth1)
    run nic-port "${HVDRUN[@]}" -np 3 -H c1:1,c2:1,c3:1 -p $PORT --network-interface eth1 --gloo \
        "${TRAIN[@]}" output_dir=output/nic-port solver.max_iter=4 'solver.steps=[3]'
    eth0=$(($(traffic c2 eth0) - before0)) eth1=$(($(traffic c2 eth1) - before1))
    note "nic-port: $((SECONDS - start)) s; $(hosts_of nic-port); c2 moved $eth1 bytes through eth1, $eth0 through eth0"
    check_outputs nic-port 4 3
    expect_hosts nic-port c1 c2 c3
    [ "$eth1" -gt $((10 * eth0)) ] || die "nic-port: most of the job's bytes went through eth0, not the eth1 it named"
}

hung() { hung_under hung --gloo; }
mpi_hung() { hung_under mpi-hung "${MPI_OPTIONS[@]}"; }
hung_under() {  # hung_under NAME HOROVODRUN_OPTIONS...: rank 1 stopped; every rank waits; the stall limit ends the job
    local name=$1 rank1 t0 t1
    shift
    launch "$name" "${HVDRUN[@]}" -np 3 -H c1:1,c2:1,c3:1 "$@" "${TRAIN[@]}" output_dir=output/$name \
        solver.max_iter=100 'solver.steps=[90]' stall_limit=$STALL_LIMIT
    wait_iteration "$name" 3
    rank1=$(jobprocs c2 | awk '$2 == "python" && /-m hvd_megdet.train/ {print $1; exit}')
    on c2 bash -c "kill -STOP $rank1"
    t0=$(now)
    wait "$job" && die "$name: the job succeeded although rank 1 was stopped"
    note "$name: SIGSTOP of rank 1 (c2) with stall_limit $STALL_LIMIT s: the job ended $(since "$t0") s later"
    # Whichever comes first names rank 1: a monitor of rank 0 or 2 reaching stall_limit, or (Gloo) Gloo's own
    # timeout (30 s) failing a collective that rank 1 had started before it was stopped; the launcher then ends
    # the rest.
    grep -E "error: rank [02]: (stalled: .*; holding it up|a collective failed): rank 1 is stopped: SIGSTOP, or a debugger \(host c2, pid $rank1\)" \
        "$TMP/$name.log" >"$TMP/$name.lines" || { tail -30 "$TMP/$name.log" >&2; die "$name: no line naming rank 1 on c2"; }
    note "$name: $(head -1 "$TMP/$name.lines")"
    # The launcher ended its ssh sessions; rank 1 is still stopped, and only its monitor can end it (nobody reads
    # its output now); rank 2 ends by its monitor's SIGKILL or its failed collective.
    t1=$(now)
    all_gone "$name" "$t1" 60 "the job ended"
    note "$name: no process left in c1-c3 $(since "$t1") s after the job ended"
}

lost() { lost_under lost --gloo; }
mpi_lost() { lost_under mpi-lost "${MPI_OPTIONS[@]}"; }
lost_under() {  # lost_under NAME HOROVODRUN_OPTIONS...: c2 killed mid-run; then --resume on the two hosts left
    local name=$1 options=("${@:2}") t0 start
    declare -A gone
    launch "$name" "${HVDRUN[@]}" -np 3 -H c1:1,c2:1,c3:1 "${options[@]}" "${TRAIN[@]}" output_dir=output/$name \
        solver.max_iter=8 'solver.steps=[7]'
    wait_iteration "$name" 3
    podman kill "$PREFIX-c2" >/dev/null
    t0=$(now)
    until [ -n "${gone[c1]:-}" ] && [ -n "${gone[c3]:-}" ]; do
        for h in c1 c3; do [ -n "${gone[$h]:-}" ] || [ -n "$(jobprocs $h)" ] || gone[$h]=$(since "$t0"); done
        [ "$(since "$t0" | cut -d. -f1)" -lt 60 ] || die "$name: processes left 60 s after c2 was killed: c1: $(jobprocs c1) c3: $(jobprocs c3)"
        sleep 0.5
    done
    wait "$job" && die "$name: the job succeeded although c2 was killed"
    note "$name: c2 killed; every process gone from c1 after ${gone[c1]} s, from c3 after ${gone[c3]} s; the launcher ended after $(since "$t0") s"
    # Rank 0 names the lost rank: its failed collective, or (when the launcher, seeing c2's ssh session end, is
    # quicker and SIGTERMs rank 0) its watchdog's monitor.
    note "$name: $(grep -E "error: rank [0-9]+: " "$TMP/$name.log" | tr '\n' ' ')"
    grep -qE "error: rank 0: (a collective failed|ended by the launcher; gone before): rank 1 .*\(host c2, pid [0-9]+\)" \
        "$TMP/$name.log" || { tail -30 "$TMP/$name.log" >&2; die "$name: rank 0's line does not name rank 1 on c2"; }
    start=$SECONDS
    run "$name-resume" "${HVDRUN[@]}" -np 2 -H c1:1,c3:1 "${options[@]}" "${TRAIN[@]}" output_dir=output/$name \
        solver.max_iter=8 'solver.steps=[7]' --resume
    expect "$name-resume" "resumed from"
    check_outputs "$name" 8 2
    note "$name: --resume on c1, c3: $(grep -o 'resumed from .*' "$TMP/$name-resume.log" | head -1); finished in $((SECONDS - start)) s"
}

elastic() {  # c3 stopped mid-run; training goes on on c1, c2
    local t0
    printf '%s\n' '#!/bin/sh' '# The containers that answer on their ssh port, one slot each.' \
        'for h in c1 c2 c3; do timeout 2 bash -c "exec 3<>/dev/tcp/$h/22" 2>/dev/null && echo "$h:1"; done' \
        'exit 0' >"$TMP/share/discover_hosts.sh"
    chmod 755 "$TMP/share/discover_hosts.sh"
    launch elastic "${HVDRUN[@]}" -np 3 --min-np 2 --max-np 3 --host-discovery-script /workspace/output/discover_hosts.sh --gloo \
        "${TRAIN[@]}" output_dir=output/elastic solver.max_iter=8 'solver.steps=[7]' --elastic
    wait_iteration elastic 3
    podman stop -t 2 "$PREFIX-c3" >/dev/null
    t0=$(now)
    wait "$job" || { tail -40 "$TMP/elastic.log" >&2; die "elastic: the job failed after c3 was stopped"; }
    note "elastic: c3 stopped after iteration 3; training finished $(since "$t0") s later; $(grep -o 'elastic: 2 workers.*' "$TMP/elastic.log" | head -1)"
    check_outputs elastic 8 2
    expect elastic "world size 3 x 2 images = global batch 6"
    expect elastic "world size 2 x 2 images = global batch 4"
    expect elastic "host c3 left"
}

# Slurm: slurmctld in a fourth container, ctl, slurmd in c1-c3 (docker/slurm/slurm.conf); jobs are the
# README's batch script, docker/slurm/train.sbatch, submitted by the user hvd from ctl.
slurm_up() {  # the controller's container and every daemon running (again after a container restart), nodes idle
    local deadline=$((SECONDS + 120)) h
    if ! podman container exists "$PREFIX-ctl"; then
        podman run -d --name "$PREFIX-ctl" --hostname ctl --network-alias ctl --network "$PREFIX-a" \
            -v "$ROOT/docker/slurm/train.sbatch:/workspace/train.sbatch:ro" -v "$TMP/share:/workspace/output" \
            "$CLUSTER_IMAGE" sleep infinity >/dev/null
    fi
    podman exec --user 0 "$PREFIX-ctl" slurm-daemons controller
    for h in "${HOSTS[@]}"; do podman exec --user 0 "$PREFIX-$h" slurm-daemons node; done
    until [ "$(podman exec "$PREFIX-ctl" sinfo -h -N -o %T | sort -u)" = idle ]; do
        [ $SECONDS -lt $deadline ] || die "slurm: nodes not idle after 120 s: $(podman exec "$PREFIX-ctl" sinfo -N 2>&1)"
        sleep 1
    done
}
submit() {  # submit NAME LAUNCH TRAIN_OVERRIDES...: train.sbatch on c1-c3, one rank each, in the background; sets $job
    local name=$1 launch=$2
    shift 2
    slurm_up
    say "$name: sbatch --nodes=3 --ntasks-per-node=1 (LAUNCH=$launch) train.sbatch $* (background)"
    timeout -k 10 "$RUN_TIMEOUT" podman exec -w /workspace "$PREFIX-ctl" sbatch --wait --job-name="$name" \
        --nodes=3 --ntasks-per-node=1 --output="output/$name.out" \
        --export="ALL,LAUNCH=$launch,OMPI_MCA_btl_tcp_if_include=eth0,HOROVODRUN_ARGS=--network-interface eth0" \
        train.sbatch "${TRAIN_ARGS[@]}" output_dir="output/$name" "$@" >"$TMP/$name.log" 2>&1 &
    job=$!
}
job_output() { cat "$TMP/share/$1.out" >>"$TMP/$1.log" 2>/dev/null || true; }  # the job's output into its log
slurm_run() {  # slurm_run NAME LAUNCH: a whole job of 4 iterations, and checks
    local name=$1 start=$SECONDS
    submit "$name" "$2" solver.max_iter=4 'solver.steps=[3]'
    wait "$job" || { job_output "$name"; tail -40 "$TMP/$name.log" >&2; die "$name: the job failed (log above)"; }
    job_output "$name"
    check_outputs "$name" 4 3
    expect_hosts "$name" c1 c2 c3
    note "$name: $((SECONDS - start)) s from sbatch to its end; $(hosts_of "$name")"
}
slurm_srun() { slurm_run slurm-srun srun; }  # srun --mpi=pmix starts the ranks
slurm_horovodrun() { slurm_run slurm-horovodrun horovodrun; }  # horovodrun in the allocation

slurm_scancel() {  # scancel mid-run: every process gone within seconds; a new job --resumes
    local name=slurm-scancel t0 start
    submit "$name" srun solver.max_iter=100 'solver.steps=[90]'
    wait_iteration "$name" 5
    podman exec "$PREFIX-ctl" scancel --name="$name"
    t0=$(now)
    all_gone "$name" "$t0" 30 scancel
    note "$name: scancel after iteration 5: every process (ranks, data loaders, slurmstepd) gone from c1-c3 after $(since "$t0") s"
    wait "$job" && die "$name: sbatch --wait reported success for a cancelled job"
    [ -z "$(podman exec "$PREFIX-ctl" squeue -h)" ] || die "$name: jobs left in the queue: $(podman exec "$PREFIX-ctl" squeue)"
    job_output "$name"
    start=$SECONDS
    mv "$TMP/$name.log" "$TMP/$name-cancelled.log"
    submit "$name" srun solver.max_iter=8 'solver.steps=[7]'
    wait "$job" || { job_output "$name"; tail -40 "$TMP/$name.log" >&2; die "$name: the resubmitted job failed (log above)"; }
    job_output "$name"
    expect "$name" "resumed from"
    check_outputs "$name" 8 3
    note "$name: submitted again: $(grep -o 'resumed from .*' "$TMP/$name.log" | head -1); finished in $((SECONDS - start)) s"
}

reset_hosts() {  # every container running, and no job process left in any (after a scenario that failed)
    local h
    podman exec "$PREFIX-ctl" scancel --user=hvd >/dev/null 2>&1 || true
    for h in "${HOSTS[@]}"; do
        podman start "$PREFIX-$h" >/dev/null
        on "$h" python -c 'import os, psutil
for p in psutil.process_iter(["name"]):
    if p.pid not in (1, os.getpid()) and p.info["name"] not in '"$DAEMONS"':
        p.kill()' || true
    done
}

# Each scenario runs in a subshell: one that fails is reported, and the others still run.
failed=()
for scenario in ${SCENARIOS:-plain nic_port mpi mpirun_plain hung mpi_hung lost mpi_lost elastic slurm_srun slurm_horovodrun slurm_scancel}; do
    ( "$scenario" ) || failed+=("$scenario")
    reset_hosts
done
say "summary:"
cat "$TMP/notes" >&2
[ ${#failed[@]} = 0 ] || die "failed: ${failed[*]} (their lines above)"
say "ok"
