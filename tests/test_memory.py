"""experiments/memory.py against closed forms: the logical size of the parameters is Gopher's
count (13 d^2 L + V d, with the norm scales and u, v biases) in fp32 and Adam's state twice
that plus two int32 step counters (Adam's and the schedule's); a replicated tree weighs its whole size on every device; ZeRO-1 divides Adam's state
over the data axis and FSDP the parameters too; `--abstract` (arithmetic on the shardings)
agrees with the allocated arrays' shards on a tensor-parallel mesh. The CLI's bad flags are
one line.

The module registers absl flags when imported, so it runs in subprocesses here."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
)

_CODE = """
import json
from experiments import common, memory
from experiments.configs import gopher as gopher_configs

model_cfg, train_cfg, _, _ = common.configs_from_dict(gopher_configs.get_config("test"))
cases = [((8, 1), 0, False), ((8, 1), 1, False), ((8, 1), 3, False),
         ((4, 2), 1, False), ((4, 2), 1, True), ((4, 2), 3, False), ((4, 2), 3, True)]
out = [memory.measure(model_cfg, train_cfg, mesh, zero, "fp32", abstract)
       for mesh, zero, abstract in cases]
m = model_cfg
print(json.dumps({"results": out, "model": [m.num_layers, m.d_model, m.num_heads,
                                            m.key_size, m.vocab_size]}))
"""


def test_per_device_bytes_against_closed_forms():
    proc = subprocess.run(
        [sys.executable, "-c", _CODE], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    layers, d, heads, key, vocab = out["model"]
    count = 13 * d * d * layers + vocab * d + layers * (2 * d + 2 * heads * key) + d
    moments, counters = 2 * 4 * count, 2 * 4
    rep, zero1, fsdp, tp1, tp1_abs, tp3, tp3_abs = out["results"]
    for r in out["results"]:
        assert r["logical_bytes"] == {"params": 4 * count, "opt_state": moments + counters}, r
        assert r["not_partitioned"] == [], r  # every dimension here splits evenly
        for part in ("params", "opt_state"):  # no device holds less than its share
            assert r["per_device_bytes"][part] * 8 >= r["logical_bytes"][part], r

    # zero=0 on (8, 1): everything replicated.
    assert rep["per_device_bytes"] == rep["logical_bytes"]
    assert rep["total_bytes"] == {k: 8 * v for k, v in rep["logical_bytes"].items()}
    # ZeRO-1: the parameters replicated, Adam's moments split eight ways.
    assert zero1["per_device_bytes"]["params"] == 4 * count
    assert zero1["per_device_bytes"]["opt_state"] == moments // 8 + counters
    assert zero1["total_bytes"]["opt_state"] == moments + 8 * counters
    # FSDP: both split eight ways (the counters are scalars, on every device).
    assert fsdp["per_device_bytes"] == {
        "params": 4 * count // 8,
        "opt_state": moments // 8 + counters,
    }
    # Tensor parallel: the model axis halves the matmul weights, data splits what ZeRO asks.
    assert tp1["per_device_bytes"]["params"] < 4 * count * 0.6
    # FSDP on (4, 2): everything split eight ways but the 2L + 1 norm scales, which split over
    # data alone, so the model axis holds them twice.
    norms = 4 * (2 * layers + 1) * d
    assert tp3["total_bytes"]["params"] == 4 * count + norms
    assert tp3["per_device_bytes"]["params"] == (4 * count - norms) // 8 + norms // 4
    # The abstract sums (no arrays) equal the allocated shards'.
    assert tp1_abs["per_device_bytes"] == tp1["per_device_bytes"]
    assert tp3_abs["per_device_bytes"] == tp3["per_device_bytes"]


def test_bad_mesh_is_one_line(tmp_path):
    out = tmp_path / "memory.jsonl"
    out.write_text('{"kept": true}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.memory",
            "--config=experiments/configs/gopher.py:test",
            "--mesh=4x2",
            f"--out={out}",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "--mesh='4x2'" in lines[0] and "--mesh=4,2" in lines[0], lines
    assert out.read_text() == '{"kept": true}\n'
