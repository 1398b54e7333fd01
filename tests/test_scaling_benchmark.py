"""benchmarks/scaling.py on tiny sizes: it runs through the real store/loader/trainer and cleans up after itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_scaling_benchmark_runs_on_tiny_sizes(tmp_path):
    sizes = (20_000, 40_000)
    d = 64
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--sizes", ",".join(map(str, sizes)), "--d", str(d),
         "--dtype", "float16", "--dir", str(tmp_path), "--batch", "1024", "--width", "128", "--k", "8",
         "--train-steps", "3", "--no-doc"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for rows, line in zip(sizes, lines):
        assert line.startswith(f"rows {rows:,}:"), line
        disk = float(re.search(r"disk ([\d,.]+) MB", line).group(1).replace(",", "")) * 1e6
        assert rows * d * 2 <= disk <= rows * d * 2 * 1.5  # float16 activations + int32 row arrays
        assert float(re.search(r"peak RSS ([\d,]+) MiB", line).group(1).replace(",", "")) > 0
    assert re.fullmatch(r"time exponent: write -?[\d.]+, loader pass -?[\d.]+ \(goal <= 1.05\), O_DIRECT at every size -?[\d.]+; loader CPU time "
                        r"\(user \+ sys\) (-?[\d.]+|nan), user only (-?[\d.]+|nan)", lines[-2])  # nan: a CPU time under a tick
    assert re.fullmatch(r"RSS ratio largest/smallest: [\d.]+ \(goal <= 1.2\)", lines[-1])
    assert list(tmp_path.iterdir()) == []  # every temporary store was deleted
