#!/usr/bin/env python3
"""Where a fleet benchmark run's time went, from the workers' debug logs.

Run the benchmark with the workers' logs kept at debug level, then summarise the last N orders:

    make bench-fleet BENCH_ARGS="--worker-logs /tmp/wl --worker-env RUST_LOG=info,orderfleet=debug ..."
    python3 scripts/worker-log-summary.py /tmp/wl 800

The window starts at the N-th last `OrderPlaced` the orders handler handled (the latency phase's
orders when it ran last). Per handler, in milliseconds (p50 / p99):
- age: from the message's SentTimestamp (when the bus delivered it to the queue) to the start
  of its handling: the time it waited in the queue and in the receive;
- elapsed: from the start of its handling to its answer: waiting for a group, and the group's
  transaction;
- groups: events per group, how long the group's oldest event waited for it, and how long it
  took;
- relay: rows per pass and how long a pass took (read, PutEvents, delete, commit);
- published on commit: events per hand-off and how long its PutEvents calls took (the delete
  comes later, with other hand-offs');
- target: each change of the in-flight target in the window, as from -> to.
"""
import collections
import glob
import json
import os
import sys


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else None


def both(values):
    return f"{pct(values, 0.5)} / {pct(values, 0.99)}"


def read(path):
    with open(path) as f:
        for line in f:
            if line.startswith('{"timestamp"'):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    pass


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    folder, orders = sys.argv[1], int(sys.argv[2])
    logs = {os.path.basename(p): list(read(p)) for p in sorted(glob.glob(f"{folder}/*.log"))}
    placed = [
        x["timestamp"]
        for lines in logs.values()
        for x in lines
        if x.get("message") == "handled"
        and x.get("span", {}).get("handler") == "orders"
        and x["span"].get("detail_type") == "OrderPlaced"
    ]
    if len(placed) < orders:
        sys.exit(f"only {len(placed)} OrderPlaced handled in {folder}: were the logs at debug level?")
    start = sorted(placed)[-orders]
    print(f"window: from {start} (the last {orders} orders placed)")
    for name, lines in logs.items():
        window = [x for x in lines if x["timestamp"] >= start]
        print(name)
        handled = collections.defaultdict(lambda: ([], []))
        targets = collections.defaultdict(list)
        groups = collections.defaultdict(list)
        passes = []
        handoffs = []
        for x in window:
            message = x.get("message")
            if message == "handled":
                age, elapsed = handled[x["span"]["handler"]]
                age.append(x.get("age_ms") or 0)
                elapsed.append(x["elapsed_ms"])
            elif message == "group ran":
                groups[x["handler"]].append(x)
            elif message == "relay pass":
                passes.append(x)
            elif message == "published on commit":
                handoffs.append(x)
            elif message == "in-flight target changed":
                targets[x["handler"]].append(f"{x['from']}->{x['to']}")
        for handler, (age, elapsed) in sorted(handled.items()):
            print(f"  {handler}: {len(age)} handled; age {both(age)}; elapsed {both(elapsed)}")
        for handler, gs in sorted(groups.items()):
            print(
                f"  {handler} groups: {len(gs)}; events {both([g['events'] for g in gs])};"
                f" oldest waited {both([g['oldest_waited_ms'] for g in gs])};"
                f" took {both([g['took_ms'] for g in gs])}"
            )
        if passes:
            print(
                f"  relay: {len(passes)} passes; rows {both([p['published'] for p in passes])};"
                f" took {both([p['took_ms'] for p in passes])}"
            )
        if handoffs:
            print(
                f"  published on commit: {len(handoffs)} hand-offs;"
                f" events {both([h['published'] for h in handoffs])};"
                f" took {both([h['took_ms'] for h in handoffs])}"
            )
        for handler, changes in sorted(targets.items()):
            print(f"  {handler} target: {len(changes)} changes: {' '.join(changes)}")


if __name__ == "__main__":
    main()
