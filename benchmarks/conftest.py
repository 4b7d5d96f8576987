"""Prints the side-by-side table after a benchmark run."""

from benchmarks.common import MIN_ROUND_S, machine


def _rows(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return {}
    groups = {}
    for b in session.benchmarks:
        if b.has_error or not b.stats:
            continue
        groups.setdefault(b.group, []).append(b)
    return groups


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # tables that benchmarks outside pytest-benchmark (bench_ckpt: several
    # processes) leave here
    for line in getattr(config, "_osf_extra_lines", []):
        terminalreporter.write_line(line)
    groups = _rows(config)
    if not groups:
        return
    w = terminalreporter.write_line
    w("")
    w(f"opensora_fast benchmarks on {machine()}")
    for group, benches in groups.items():
        med = {b.extra_info["impl"]: b.stats.median for b in benches}
        role = {b.extra_info["role"]: b.extra_info["impl"] for b in benches}
        roof = med.get(role.get("roofline"))
        base = med.get(role.get("baseline"))
        alt = med.get(role.get("alternative"))
        w("")
        w(f"[{group}]")
        mem = any("peak_extra_mb" in b.extra_info for b in benches)
        w(
            f"  {'impl':<34} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'x base':>7} {'x alt':>7}"
            + (f" {'peak MB':>8}" if mem else "")
        )
        for b in benches:
            t = b.stats.median
            gbs = b.extra_info["bytes"] / t / 1e9
            pct = f"{100 * roof / t:6.0f}%" if roof else "      -"
            xb = f"{base / t:7.2f}" if base else "      -"
            xa = f"{alt / t:7.2f}" if alt else "      -"
            pk = f" {b.extra_info['peak_extra_mb']:8.1f}" if mem else ""
            w(f"  {b.extra_info['impl']:<34} {t * 1e3:9.3f} {gbs:8.1f} {pct} {xb} {xa}{pk}")
        skip = ("impl", "role", "bytes", "peak_extra_mb", "calls_per_round")
        extra = {k: v for k, v in benches[0].extra_info.items() if k not in skip}
        if extra:
            w("  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    w("")
    w("ms: median over rounds of the time per call (a round: as many synchronised calls as fill")
    w(
        f"{MIN_ROUND_S * 1e3:g} ms, at least one); GB/s: bytes that must move / time; % copy: a copy_ of the same bytes / time;"
    )
    w("x base: speed-up over the upstream-faithful reference; x alt: over the best plain-PyTorch alternative;")
    w("peak MB: extra memory at the peak of one call (CPU: op outputs only; CUDA: allocator peak).")
