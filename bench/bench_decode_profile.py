"""Where a decode step's time goes in KV-cache decoder folders (normexport's, onnxruntime-genai's
builder's, or any with the same inputs): each runs the same greedy loop on plain onnxruntime
(1 thread, batch 1, a seeded prompt, then ``--steps`` decode steps), in interleaved rounds, and
then once under onnxruntime's profiler.

The decode time per step is the median over a round's steps; the table gives the median and the
minimum of the rounds, and each folder's ratio to the last one's median. The profile counts the
decode steps only (the prefill's run is left out): per step, the median of the profiled run
(``model_run``: kernels and the executor's work between them; the profiler makes it slower than
the unprofiled step), the kernels run, and the mean microseconds of kernel time by op type
(the first decode step, which allocates, is left out too). Two graphs
that run the same kernels show the same rows, and a layout difference shows as the rows it
moves. The profiler inflates small ops (a few microseconds each, whatever they compute).

    python bench/bench_decode_profile.py FOLDER [FOLDER ...] [--rounds 15 --steps 64 --prompt 64]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line  # noqa: E402


def session(folder: Path, profile_dir: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / folder.name)
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


def kv_shape(folder: Path) -> tuple[int, int, int]:
    """(KV heads, head size, vocabulary) from the folder's genai_config.json."""
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]
    return decoder["decoder"]["num_key_value_heads"], decoder["decoder"]["head_size"], decoder["vocab_size"]


def greedy(sess, folder: Path, prompt: int, steps: int, seed: int) -> tuple[list[float], list[int]]:
    """Seconds of each decode step and the greedy tokens."""
    heads, head_size, vocab = kv_shape(folder)
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    past = [n for n in names if n.startswith("past_key_values.")]
    cache = {n: np.zeros((1, heads, 0, head_size), np.float32) for n in past}
    ids = np.random.default_rng(seed).integers(3, vocab, size=(1, prompt))
    seen, times, tokens = 0, [], []
    for step in range(steps + 1):
        total = seen + ids.shape[1]
        feed = {**cache, "input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(seen, total, dtype=np.int64)[None]
        start = time.perf_counter()
        out = dict(zip(outputs, sess.run(None, feed)))
        if step:
            times.append(time.perf_counter() - start)
        cache = {n: out[n.replace("past_key_values.", "present.", 1)] for n in past}
        seen, ids = total, out["logits"][:, -1:].argmax(-1)
        tokens.append(int(ids[0, 0]))
    return times, tokens


def kernel_times(folder: Path, prompt: int, steps: int, seed: int) -> tuple[float, float, dict[str, float]]:
    """Over the decode steps (the prefill's run and the first decode step's left out), from
    onnxruntime's profiler: the median microseconds of a profiled run, the kernels per step, and
    op type -> mean microseconds of kernel time per step."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(folder, Path(tmp))
        greedy(sess, folder, prompt, steps, seed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[2:]
    start = runs[0]["ts"]
    per_op, kernels = collections.Counter(), 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
            kernels += 1
    n = len(runs)
    return statistics.median(e["dur"] for e in runs), kernels / n, {op: us / n for op, us in per_op.most_common()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.steps < 2 or a.rounds < 1:
        p.error("--steps must be at least 2 and --rounds at least 1")
    if len({f.resolve() for f in a.folders}) != len(a.folders):
        p.error("each folder once")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sessions = {f: session(f) for f in a.folders}
    rounds: dict[Path, list[float]] = {f: [] for f in a.folders}
    tokens = {}
    for r in range(a.rounds):
        for folder in (a.folders if r % 2 == 0 else a.folders[::-1]):  # alternate the order too
            times, tokens[folder] = greedy(sessions[folder], folder, a.prompt, a.steps, a.seed)
            rounds[folder].append(statistics.median(times) * 1000)
    print(machine_line(1))
    print(f"prompt {a.prompt}, {a.steps} decode steps, batch 1, 1 thread, plain onnxruntime; {a.rounds} interleaved rounds\n")
    last = statistics.median(rounds[a.folders[-1]])
    print("| folder | decode ms/step, median (min) | / the last | greedy tokens = the first's |")
    print("|---|---:|---:|---|")
    for folder, ms in rounds.items():
        same = "yes" if tokens[folder] == tokens[a.folders[0]] else "no"
        print(f"| {folder} | {statistics.median(ms):.4f} ({min(ms):.4f}) | {statistics.median(ms) / last:.4f} | {same} |")
    profiles = {f: kernel_times(f, a.prompt, a.steps, a.seed) for f in a.folders}
    names = [f.name for f in a.folders]
    labels = names if len(set(names)) == len(names) else [str(f) for f in a.folders]
    ops = sorted({op for _, _, prof in profiles.values() for op in prof}, key=lambda op: -max(prof.get(op, 0.0) for _, _, prof in profiles.values()))
    print("\n| decode step, profiled | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(a.folders))
    print("| **run, us (median)** | " + " | ".join(f"{run:.1f}" for run, _, _ in profiles.values()) + " |")
    print("| kernels run | " + " | ".join(f"{k:.0f}" for _, k, _ in profiles.values()) + " |")
    print("| **kernel us, all (mean per step)** | " + " | ".join(f"{sum(prof.values()):.1f}" for _, _, prof in profiles.values()) + " |")
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{prof.get(op, 0.0):.1f}" for _, _, prof in profiles.values()) + " |")


if __name__ == "__main__":
    main()
