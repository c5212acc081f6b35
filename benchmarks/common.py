"""What every benchmark script shares: the CPU probe, clips, process control, percentiles.

No benchmark script imports another one; each imports this module (and ``harness.py`` for
the offline workloads), so the scripts never import each other in a circle.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".cache" / "bench"
RESULTS = ROOT / "benchmarks" / "results"

MATMUL = """
import json, time, torch
torch.manual_seed(0)
out = {}
for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    out[name] = 5 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9
print(json.dumps(out))
"""


def probe_cpu(timeout_s: float = 120.0, cpuinfo: str | None = None) -> dict:
    """CPU model, bf16-relevant flags and whether bf16 is native (flags, else a timed matmul).

    Machines of our kind differ: without avx512_bf16 / amx_bf16, bf16 matmuls run hundreds of
    times slower than fp32, and a bf16 7B engine never reaches its first token."""
    model_name, flags = "unknown", set()
    try:
        for line in (cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()).splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model_name == "unknown":
                model_name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx512f", "avx2")
    found = [f for f in wanted if f in flags]
    out = {"cpu_model": model_name, "flags_found": found, "cores": os.cpu_count(),
           "bf16_native": "avx512_bf16" in flags or "amx_bf16" in flags, "matmul_gflops": None}
    if out["bf16_native"]:
        out["bf16_basis"] = "cpuinfo flag " + ("amx_bf16" if "amx_bf16" in flags else "avx512_bf16")
        return out
    try:
        r = subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True, timeout=timeout_s,
                           check=False)
        g = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        g = None
    out["matmul_gflops"] = g
    out["bf16_fast"] = bool(g and g["bfloat16"] >= 0.8 * g["float32"])
    out["bf16_basis"] = ("no bf16 flag; bf16 matmul " + (f"{g['bfloat16']:.0f} GFLOP/s vs fp32 {g['float32']:.0f}"
                         if g else f"timed out or failed ({timeout_s:.0f} s)"))
    return out


def cpu_line(cpu: dict) -> str:
    return (f"CPU: {cpu['cpu_model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags_found']) or '-'}, "
            f"bf16 native: {'yes' if cpu['bf16_native'] else 'no'} ({cpu['bf16_basis']})")


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 16.0


def make_clips(buckets: list[float]) -> dict[float, Path]:
    """One espeak-ng utterance per length, 16 kHz, built once into .cache/bench."""
    from vllm_affinity_tools import speech

    clips = {}
    for i, s in enumerate(buckets):
        p = CACHE / f"speech-{s:g}s.wav"
        if not p.exists():
            speech.utterance(s, p, seed=i, sample_rate=16000)
        clips[s] = p
    return clips


def load_cfg(spec):
    from vllm_affinity.config import load_spec

    return load_spec(spec if spec is not None else "off")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cpu_busy_jiffies() -> int:
    """All CPUs' busy time so far (user+nice+system+irq+softirq+steal), in clock ticks."""
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def run_measured(cmd: list[str], log_path: Path, env: dict, timeout_s: float) -> dict:
    """Run ``cmd`` in its own process group (killed as a group at the timeout); returns its
    exit status, wall time, its own CPU seconds and the CPUs other processes used meanwhile
    (from /proc/stat minus the child's rusage), so a noisy machine shows in every result."""
    busy0, t0 = cpu_busy_jiffies(), time.monotonic()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log_path.open("w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = -9
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, busy = time.monotonic() - t0, (cpu_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
    own = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    return {"rc": rc, "wall_s": wall, "engine_cpu_s": own, "other_cpu_per_s": max(0.0, busy - own) / wall}
