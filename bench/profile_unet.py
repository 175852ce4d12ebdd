#!/usr/bin/env python
"""Where one U-Net step's time goes: per-op times of the compiled step from the XLA profiler.

    python bench/profile_unet.py --bundle /tmp/brain-ldm-bench/converted/brain_ldm.1

Runs one DDIM-step U-Net forward (batch 1, 20×28×20 latent, the full-size network from a
converted bundle; ``--random`` builds random weights instead), warms it up, then traces
``--repeats`` calls with :func:`jax.profiler.trace` and sums the duration of every XLA thunk
(one per HLO instruction: fusions, custom calls, dots, copies) per call. Each instruction is put
in a category (oneDNN convolution, matrix product, GroupNorm/SiLU, layout copy/transpose,
concatenation, other elementwise) from its opcode and the source line JAX recorded in its
metadata; the table lists the categories and the slowest instructions with their source lines.
Thunks of independent instructions may overlap on the CPU's threads, so the sum can exceed
the wall time: both are printed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name → (opcode or fusion kind, "file:line" of its source) from compiled HLO text."""
    table = {}
    computations = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
            continue
        match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+(?: \S+)?? ?[^=]*? ([a-z\-]+)\(", line)
        if match is None:
            match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\(", line)
        if match is None:
            continue
        name, opcode = match.group(1), match.group(2)
        source = re.search(r'source_file="([^"]+)" source_line=(\d+)', line)
        where = f"{Path(source.group(1)).name}:{source.group(2)}" if source else ""
        if opcode == "fusion":
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            opcode = "fusion:" + (calls.group(1) if calls else "")
        if opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            opcode = "custom-call:" + (target.group(1) if target else "")
        table[name] = (opcode, where)
        if current is not None:
            computations[current].append((opcode, where))
    # A fusion's category follows what it computes: its fused computation's opcodes and sources.
    for name, (opcode, where) in list(table.items()):
        if opcode.startswith("fusion:"):
            inner = computations.get(opcode.split(":", 1)[1], [])
            ops = sorted({op for op, _ in inner if op not in ("parameter", "constant", "broadcast",
                                                                   "bitcast", "reshape")})
            sources = collections.Counter(w for _, w in inner if w)
            table[name] = ("fusion[" + ",".join(ops) + "]", where or (sources.most_common(1)[0][0] if sources else ""))
    return table


def category(opcode: str, where: str) -> str:
    file, _, _ = where.partition(":")
    if "brain_ldm_onednn" in opcode:
        return "oneDNN convolution (custom call)"
    if opcode in ("dot",) or "dot" in opcode or "convolution" in opcode:
        return "matrix product / XLA conv (attention, 1×1×1, linear)"
    if opcode in ("copy", "transpose") or opcode.startswith("fusion[copy") or opcode == "fusion[transpose]":
        return "layout copy / transpose"
    if "concatenate" in opcode:
        return "concatenation"
    if file == "layers.py" and "reduce" in opcode:
        return "GroupNorm/LayerNorm statistics (reductions)"
    if "reduce" in opcode:
        return "other reductions (softmax, pooling)"
    return "elementwise (norm apply, SiLU, residual, GELU, pad, slices)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(tempfile.gettempdir()) / "brain-ldm-bench" / "converted"
                        / "brain_ldm.1")
    parser.add_argument("--random", action="store_true", help="random full-size weights instead of --bundle")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plain-kernels", action="store_true",
                        help="do not pack the kernels once (from_pretrained does): reorder them on every call")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="write the per-op table as JSON here")
    args = parser.parse_args()

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from brain_ldm_nodes.models import onednn
    from brain_ldm_nodes.pipeline import BrainLDM

    if args.random:
        from brain_ldm_nodes.models.unet import DiffusionModelUNet
        unet = DiffusionModelUNet(key=jax.random.key(0))
    else:
        unet = BrainLDM.from_pretrained(args.bundle).unet
    from brain_ldm_nodes.models.layers import unpack_kernels
    from brain_ldm_nodes.models.unet import pack_unet_kernels
    unet = unpack_kernels(unet) if args.plain_kernels else pack_unet_kernels(unet, (20, 28, 20))
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 3, 20, 28, 20), dtype=np.float32))
    cond = jnp.asarray(np.array([[1.0, 0.7, 0.7, 0.5]], np.float32))

    params, static = eqx.partition(unet, eqx.is_array)

    def forward(params, z, cond):
        x = jnp.concatenate([z, jnp.broadcast_to(cond[:, :, None, None, None], (1, 4, *z.shape[2:]))], axis=1)
        return jax.vmap(eqx.combine(params, static))(x, jnp.array([500]), cond[:, None, :])

    compiled = jax.jit(forward).lower(params, z, cond).compile()
    hlo_text = compiled.as_text()
    table = instruction_table(hlo_text)
    if args.out:
        args.out.with_suffix(".hlo.txt").write_text(hlo_text)

    def step(unet, z, cond):
        return compiled(params, z, cond)

    step(unet, z, cond).block_until_ready()
    onednn.phase_seconds(reset=True)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(unet, z, cond).block_until_ready()
                walls.append(time.perf_counter() - start)
        trace = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X" and event.get("name") in table:
            per_op[event["name"]] += event["dur"] / 1e6 / args.repeats
    per_category: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for name, seconds in per_op.items():
        key = category(*table[name])
        per_category[key] += seconds
        count[key] += 1
    total = sum(per_op.values())
    print(f"oneDNN: {onednn.available()}; wall per step {min(walls):.2f} s (min of {args.repeats}); "
          f"sum of op times {total:.2f} s; {len(per_op)} ops timed")
    phases = onednn.phase_seconds()
    if onednn.available():
        print("inside the oneDNN calls, s per step: " + ", ".join(
            f"{phase} {seconds / args.repeats:.3f}" for phase, seconds in phases.items()))
    print("| category | s per step | share | ops |\n|---|---|---|---|")
    for key, seconds in sorted(per_category.items(), key=lambda item: -item[1]):
        print(f"| {key} | {seconds:.3f} | {seconds / total:.0%} | {count[key]} |")
    print(f"\n| slowest ops | s | opcode | source |\n|---|---|---|---|")
    for name, seconds in sorted(per_op.items(), key=lambda item: -item[1])[:args.top]:
        print(f"| {name} | {seconds:.3f} | {table[name][0][:60]} | {table[name][1]} |")
    by_source: dict[str, float] = collections.defaultdict(float)
    for name, seconds in per_op.items():
        opcode, where = table[name]
        if "brain_ldm_onednn" not in opcode:
            by_source[where] += seconds
    print(f"\n| non-convolution time by source line | s |\n|---|---|")
    for where, seconds in sorted(by_source.items(), key=lambda item: -item[1])[:args.top]:
        print(f"| {where or '?'} | {seconds:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"wall_s": walls, "per_op_s": per_op, "ops": table,
                                        "per_category_s": per_category}, indent=1))


if __name__ == "__main__":
    main()
