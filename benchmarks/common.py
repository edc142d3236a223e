"""What several benchmarks share: the repository's paths, the yardsticks' venv, the torchrun command line, and
the host line every run prints first."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench.py")  # workers are relaunched through it: `bench.py NAME --worker ...`
# Math-Verify (bench.py grader) and TRL (bench.py train) live in their own venv: yardsticks, not dependencies
BENCH_PYTHON = ".venv-bench/bin/python"


def torchrun(nproc: int, script: str, *args) -> list:
    """The command line that runs `script args` on nproc local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            script, *args]


def host() -> str:
    """One line naming the CPU and timing a matmul, so figures taken at different times or on different
    machines are not compared blindly."""
    import platform
    import time
    import torch
    info = {}
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name alone ("AMD EPYC") hides the generation
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    name = info.get("model name") or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(512, 512)                                                    # (512, 512)
    times = []
    for _ in range(5):  # best of 5 x 20 products: how fast one core is right now, neighbours included
        t0 = time.perf_counter()
        for _ in range(20):
            a @ a
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    gflops = 20 * 2 * 512 ** 3 / min(times) / 1e9
    return (f"host: {name} (family {info.get('cpu family', '?')} model {info.get('model', '?')}), "
            f"{os.cpu_count()} cores, {isa}; fp32 matmul on one core now: {gflops:.0f} GFLOPS")
