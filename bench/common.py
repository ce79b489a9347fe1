"""Shared benchmark plumbing: machine description, peak-memory probes, result rows -> table + JSON."""
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

from unlearn_engine.atomic import write_text

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                python=platform.python_version(), cpu=cpu, cpu_threads=torch.get_num_threads(),
                cpu_cores=os.cpu_count(), load_average=load_average(), device="cpu")
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name())
    return info


def device_tag() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        return next((tag for tag in ("h200", "h100", "a100", "l40") if tag in name), "gpu")
    return "cpu"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS and returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def probe_in_subprocess(module: str, args: list, env: dict | None = None) -> dict:
    """Run `python -m module args` (a memory probe that prints one JSON line) in a fresh process,
    so the peak RSS it reports belongs to that one computation. `env`: variables added to this one's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                         cwd=root, check=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])


# glibc raises its mmap threshold (up to 32 MiB) after a large free, and later buffers below it then reuse pages
# already counted in RSS: a fixed threshold keeps every large buffer a fresh mapping, seen by the peak-RSS probe.
FRESH_MAPPINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}


def load_average() -> list:
    """The machine's 1, 5 and 15-minute load averages now (runnable + waiting tasks; this machine has
    os.cpu_count() cores): how busy it was while a timing ran."""
    return [round(x, 2) for x in os.getloadavg()]


def interleaved_min_times(fns: dict, rounds: int, warmup: int = 1, sync=None) -> dict:
    """Each of `fns` (name -> callable) timed `rounds` times, the callables taking turns within every round, so a
    load that comes and goes on a shared machine falls on all of them alike; `warmup` untimed rounds first (a
    compiled peer compiles there). Returns name -> dict(min_s, times_s). `sync` (e.g. torch.cuda.synchronize)
    runs before each clock read."""
    import time

    def timed(fn):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: dict(min_s=min(t), times_s=t) for name, t in times.items()}


class Results:
    """Rows of one benchmark family; ratios are taken against the row whose impl is `baseline`."""

    def __init__(self, family: str, baseline: str):
        self.family, self.baseline, self.rows = family, baseline, []

    def add(self, **row):
        self.rows.append(row)

    def with_ratios(self):
        keyed = {}
        for row in self.rows:
            keyed.setdefault(row["case"], {})[row["impl"]] = row
        out = []
        for impls in keyed.values():
            base = impls.get(self.baseline)
            for row in impls.values():
                row = dict(row)
                if base:
                    row["time_ratio"] = row["time_s"] / base["time_s"]
                    for key in ("peak_extra_mb", "workspace_mb"):
                        if row.get(key) is not None and base.get(key):
                            row[key.replace("_mb", "_ratio")] = row[key] / base[key]
                out.append(row)
        return out

    def table(self) -> str:
        rows = self.with_ratios()
        cols = ["case", "impl", "time_s", "time_ratio", "peak_extra_mb", "peak_extra_ratio", "workspace_mb",
                "workspace_ratio"]
        extra = sorted({k for r in rows for k in r} - set(cols) - {"shape"})
        cols += extra

        def fmt(v):
            return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

        cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"[{self.family}] ratios are against '{self.baseline}'\n" + "\n".join(lines)

    def write(self) -> str:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        info = machine()
        path = os.path.join(RESULTS_DIR, f"{info['date']}-{device_tag()}-{self.family}.json")
        write_text(path, json.dumps(dict(family=self.family, baseline=self.baseline, machine=info,
                                         results=self.with_ratios()), indent=2))
        return path


def copy_bandwidth(x: torch.Tensor, rounds: int = 5) -> dict:
    """The machine's copy bandwidth on a tensor like x, now: GB/s (one read + one write of x, best of `rounds`)
    of x.clone() (a fresh output, whose pages are faulted in, as an out-of-place op pays) and of out.copy_(x)
    into a buffer written before (the hardware's copy rate)."""
    import time

    def best(fn):
        fn()
        times = []
        for _ in range(rounds):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    out = torch.empty_like(x)
    moved = 2 * x.numel() * x.element_size()
    return dict(clone_gb_per_s=moved / best(lambda: x.clone()) / 1e9,
                copy_gb_per_s=moved / best(lambda: out.copy_(x)) / 1e9)
