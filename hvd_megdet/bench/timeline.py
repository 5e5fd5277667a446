"""Where CGBN's allreduces wait, read from a Horovod timeline (HOROVOD_TIMELINE, rank 0's coordinator view).

    python -m hvd_megdet.bench.timeline TIMELINE.json [--json OUT]

`bench.train_iter --trace DIR` writes DIR/horovod_timeline.json. For every CGBN allreduce (tensor names
`sync_bn.*`) this takes the moment the last rank asked for it (the negotiation's per-rank marks), the moment
Horovod's background thread started executing it (GLOO_/NCCL_/MPI_ALLREDUCE), and how much of that interval
the thread spent executing other allreduces: the gradient allreduces that hvd.DistributedOptimizer starts
during the same backward pass ("gradients"), or other CGBN ones. If CGBN's small blocking allreduces queue
behind the gradients, "behind gradients" is most of "ready -> executing".
"""
import argparse
import json
import statistics
from collections import defaultdict

EXECUTE = ("GLOO_ALLREDUCE", "NCCL_ALLREDUCE", "MPI_ALLREDUCE")


def parse(events):
    """[(tensor name, last rank's request ts, execution begin ts, execution end ts)] of every allreduce in a
    Horovod timeline's event list (microseconds); an instance not executed by the end is left out."""
    names, stacks, current = {}, defaultdict(list), {}
    done = []
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {}):
            names[e["pid"]] = e["args"]["name"]
            continue
        pid, ph = e.get("pid"), e.get("ph")
        if ph == "B":
            stacks[pid].append(e["name"])
            if e["name"] == "NEGOTIATE_ALLREDUCE":
                current[pid] = {"asked": e["ts"]}
            elif e["name"] in EXECUTE and pid in current:
                current[pid]["begin"] = e["ts"]
        elif ph == "X" and stacks[pid][-1:] == ["NEGOTIATE_ALLREDUCE"] and pid in current:
            current[pid]["asked"] = max(current[pid]["asked"], e["ts"])  # one mark per rank that asked
        elif ph == "E" and stacks[pid]:
            name = stacks[pid].pop()
            if name in EXECUTE and pid in current and "begin" in current[pid]:
                item = current.pop(pid)
                done.append((names.get(pid, str(pid)), item["asked"], item["begin"], e["ts"]))
    return done


def _overlap(start, end, intervals):
    """Microseconds of [start, end] covered by the union of `intervals` ([(begin, end)], sorted by begin)."""
    covered, reach = 0, start
    for begin, stop in intervals:
        begin, stop = max(begin, reach), min(stop, end)
        if stop > begin:
            covered += stop - begin
            reach = stop
    return covered


def summarize(allreduces):
    """{CGBN kind (name suffix): {"count", "ready_to_execute_ms", "behind_gradients_ms", "behind_cgbn_ms",
    "execute_ms"}}: medians over the instances of each kind."""
    gradients = sorted((b, e) for n, _, b, e in allreduces if "sync_bn." not in n)
    cgbn = sorted((b, e) for n, _, b, e in allreduces if "sync_bn." in n)
    rows = defaultdict(lambda: defaultdict(list))
    for name, asked, begin, end in allreduces:
        if "sync_bn." not in name:
            continue
        row = rows[name.rsplit(".", 1)[1]]
        row["ready_to_execute_ms"].append((begin - asked) / 1e3)
        row["behind_gradients_ms"].append(_overlap(asked, begin, gradients) / 1e3)
        row["behind_cgbn_ms"].append(_overlap(asked, begin, [iv for iv in cgbn if iv != (begin, end)]) / 1e3)
        row["execute_ms"].append((end - begin) / 1e3)
    return {kind: {"count": len(row["execute_ms"]), **{k: statistics.median(v) for k, v in row.items()}}
            for kind, row in sorted(rows.items())}


def format_table(summary):
    lines = ["| CGBN allreduce | count | all asked -> executing (ms) | of which gradients executing (ms) | "
             "other CGBN executing (ms) | executing (ms) |", "|---|---|---|---|---|---|"]
    for kind, row in summary.items():
        lines.append(f"| {kind} | {row['count']} | {row['ready_to_execute_ms']:.2f} | {row['behind_gradients_ms']:.2f} | "
                     f"{row['behind_cgbn_ms']:.2f} | {row['execute_ms']:.2f} |")
    return "\n".join(lines)


def load(path):
    """The event list of a Horovod timeline file (a JSON array that Horovod may leave unterminated)."""
    text = open(path).read().rstrip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    summary = summarize(parse(load(args.timeline)))
    print(format_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
