"""The demo's results: the JSON document, the printed table, the chart (matplotlib,
imported only here) and the sample video, each written to a temporary name and
renamed, so a failed or interrupted write leaves nothing half-written."""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional

import torch

from .loop import PHASES, UTILITY

GOAL = 3.0
# Agreement of the runs: the same seeds and the same arithmetic order except the
# fp32 reductions inside the replaced helpers (loss, EMA), so the figures agree to
# fp32 rounding carried through a few bf16 steps
LOSS_RTOL = 1e-3
EMA_RTOL = 1e-4  # of the EMA's sum of |x|


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: torch.device) -> str:
    desc = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def machine_slug(device: torch.device) -> str:
    """File-name-safe: the GPU's name when running on one, else the CPU's, plus the thread count
    (the form benchmarks/collect.py uses, so a demo and the op benchmarks of one machine pair up)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    name = re.sub(r"\((R|TM)\)|processor|cpu|@.*", "", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug or 'unknown'}-{torch.get_num_threads()}t"


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


def _agreement(base: dict, other: dict) -> dict:
    la, lb = base["losses"][-1], other["losses"][-1]
    loss_diff = abs(la - lb)
    ema_diff = abs(base["ema"]["sum"] - other["ema"]["sum"])
    scale = max(base["ema"]["abs_sum"], 1e-30)
    loss_ok = loss_diff <= LOSS_RTOL * max(abs(la), 1e-30)
    ema_ok = ema_diff <= EMA_RTOL * scale
    return {
        "final_loss": [la, lb],
        "loss_abs_diff": loss_diff,
        "loss_rel_diff": loss_diff / max(abs(la), 1e-30),
        "max_loss_rel_diff": max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(base["losses"], other["losses"])),
        "ema_sum": [base["ema"]["sum"], other["ema"]["sum"]],
        "ema_sum_diff_over_abs_sum": ema_diff / scale,
        "ema_bit_identical": base["ema"]["sha256"] == other["ema"]["sha256"],
        "sample_latent_sum": [base["sampling"]["latent_sum"], other["sampling"]["latent_sum"]],
        "tolerance": f"final loss within rel {LOSS_RTOL:g}; EMA sum within {EMA_RTOL:g} x sum|EMA|",
        "ok": bool(loss_ok and ema_ok),
    }


def build_document(
    runs: List[dict], summaries: List[dict], size, steps: int, device: torch.device, seed: int, extra: dict
) -> dict:
    from .. import build_info
    from .sides import EMA_DECAY

    base, base_sum = runs[0], summaries[0]
    doc_runs, speedups, agreement = {}, {}, {}
    for run, s in zip(runs, summaries):
        sampling = {k: v for k, v in run["sampling"].items() if k != "video"}
        doc_runs[run["side"]] = {
            "label": run["label"],
            **s,
            "final_loss": run["losses"][-1],
            "losses": run["losses"],
            "ema_checksum": run["ema"],
            "booster_s": run["booster_s"],
            "saves": run["saves"],
            "peak_memory_bytes": run["peak_memory_bytes"],
            "base_memory_bytes": run["base_memory_bytes"],
            "memory_kind": run["memory_kind"],
            "sampling": sampling,
        }
        if run is base:
            continue
        bp, op = base_sum["phases"], s["phases"]
        sp = {p: _ratio(bp[p]["median_ms"], op[p]["median_ms"]) for p in PHASES}
        sp["checkpoint"] = _ratio(bp["checkpoint"]["mean_ms"], op["checkpoint"]["mean_ms"])
        sp["sample_condition"] = _ratio(bp["sample_condition"]["median_ms"], op["sample_condition"]["median_ms"])
        sp["background"] = _ratio(bp["background"]["mean_ms"], op["background"]["mean_ms"])
        for p in ("sample_denoise", "drain"):
            sp[p] = _ratio(bp[p]["total_s"], op[p]["total_s"])
        sp["forward+loss"] = _ratio(
            bp["forward"]["median_ms"] + bp["loss"]["median_ms"], op["forward"]["median_ms"] + op["loss"]["median_ms"]
        )
        for k in ("utility", "utility_without_booster", "utility_own"):
            sp[k] = _ratio(base_sum[f"{k}_ms_per_step"], s[f"{k}_ms_per_step"])
        sp["checkpoint_without_booster"] = _ratio(
            bp["checkpoint"]["mean_ms"] - base_sum["booster_ms_per_save"],
            op["checkpoint"]["mean_ms"] - s["booster_ms_per_save"],
        )
        sp["step"] = _ratio(base_sum["step_median_ms"], s["step_median_ms"])
        speedups[run["side"]] = sp
        agreement[run["side"]] = _agreement(base, run)
    fast = speedups.get("fast", {})
    measured = fast.get("utility")
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "kind": "opensora_fast demo",
        "machine": machine(device),
        "machine_slug": machine_slug(device),
        "device": str(device),
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "build": build_info(),
        "size": {**size.__dict__, "steps": steps},
        "seed": seed,
        "world_size": 1,
        "ema_decay": EMA_DECAY,
        "dtype": "bfloat16 working weights, fp32 master shards, bf16 EMA",
        "phases": list(PHASES),
        "utility_phases": list(UTILITY),
        "runs": doc_runs,
        "speedups": speedups,
        "agreement": agreement,
        "goal": {
            "target": GOAL,
            "statement": (
                f"utility phases ({', '.join(UTILITY)}) together >= {GOAL:g}x faster than upstream-faithful "
                "at the default size on 2 CPU cores and at GPU size on an H100/H200, identical results"
            ),
            "utility_speedup": measured,
            "utility_speedup_by_side": {k: v.get("utility") for k, v in speedups.items()},
            "met": bool(measured is not None and measured >= GOAL),
        },
        **extra,
    }


def _fmt_ms(v: float) -> str:
    return f"{v:10.2f}"


def _fmt_x(v: Optional[float]) -> str:
    return "       -" if v is None else f"{v:7.2f}x"


def table(doc: dict) -> str:
    """The printed summary: per-phase times, speed-ups, memory, agreement, the goal line."""
    keys = list(doc["runs"])
    runs = [doc["runs"][k] for k in keys]
    others = keys[1:]
    lines = [
        f"opensora_fast demo: size {doc['size']['name']} ({doc['size']['steps']} steps), device {doc['device']}",
        f"machine: {doc['machine']}",
        f"(the sides run in lockstep, one step of each in turn; ms: median per step after "
        f"{runs[0]['warmup_steps']} warm-up steps, checkpoint: mean per save, utility: a save counted as "
        f"1/{doc['size']['ckpt_every']} step; ratios of those; one process, world size 1; "
        "checkpoint: the time the loop waits in save; background writes: waited for after each save, "
        "untimed in the step, so one side's writes never run inside another side's phases)",
    ]
    head = (
        f"{'phase':<26}" + "".join(f"{r['label'][:22]:>24}" for r in runs) + "".join(f"{'x ' + k:>16}" for k in others)
    )
    lines += [head, "-" * len(head)]

    def row(label: str, values: List[float], ratios: List[Optional[float]]):
        lines.append(
            f"{label:<26}"
            + "".join(f"{_fmt_ms(v):>21} ms" for v in values)
            + "".join(f"{_fmt_x(x):>16}" for x in ratios)
        )

    for p in PHASES:
        if p == "checkpoint":
            continue
        row(
            "  of it VAE encode" if p == "encode" else p + (" *" if p in UTILITY else ""),
            [r["phases"][p]["median_ms"] for r in runs],
            [doc["speedups"][k][p] for k in others],
        )
    row(
        "forward+loss",
        [r["phases"]["forward"]["median_ms"] + r["phases"]["loss"]["median_ms"] for r in runs],
        [doc["speedups"][k]["forward+loss"] for k in others],
    )
    row(
        "checkpoint * (per save)",
        [r["phases"]["checkpoint"]["mean_ms"] for r in runs],
        [doc["speedups"][k]["checkpoint"] for k in others],
    )
    row("  of it Booster (same code)", [r["booster_ms_per_save"] for r in runs], [None for _ in others])
    row(
        "background writes (per save)",
        [r["phases"]["background"]["mean_ms"] for r in runs],
        [doc["speedups"][k]["background"] for k in others],
    )
    row("step (median)", [r["step_median_ms"] for r in runs], [doc["speedups"][k]["step"] for k in others])
    row(
        "sampling: condition (median)",
        [r["phases"]["sample_condition"]["median_ms"] for r in runs],
        [doc["speedups"][k]["sample_condition"] for k in others],
    )
    row(
        "utility phases per step *",
        [r["utility_ms_per_step"] for r in runs],
        [doc["speedups"][k]["utility"] for k in others],
    )
    lines.append(
        f"{'peak memory':<26}"
        + "".join(f"{r['peak_memory_bytes'] / 2**20:>20.1f} MiB" for r in runs)
        + f"   ({runs[0]['memory_kind']})"
    )
    lines.append(f"{'final loss':<26}" + "".join(f"{r['final_loss']:>24.7f}" for r in runs))
    lines.append(f"{'EMA checksum (fp64 sum)':<26}" + "".join(f"{r['ema_checksum']['sum']:>24.6f}" for r in runs))
    lines.append("* = utility phase (what opensora_fast replaces)")
    for k in others:
        a = doc["agreement"][k]
        lines.append(
            f"agreement {doc['runs'][k]['label']}: {'OK' if a['ok'] else 'MISMATCH'} ({a['tolerance']}); "
            f"loss rel diff {a['loss_rel_diff']:.2e}, EMA diff {a['ema_sum_diff_over_abs_sum']:.2e} of sum|EMA|, "
            f"EMA bit-identical: {'yes' if a['ema_bit_identical'] else 'no'}"
        )
    g = doc["goal"]
    lines.append(f"Goal: {g['statement']}.")
    for k in others:
        sp = doc["speedups"][k]
        lines.append(
            f"  measured here, {doc['runs'][k]['label']} (size {doc['size']['name']}, {doc['device']}): utility phases "
            f"{_fmt_x(sp.get('utility')).strip()} -> {'MET' if (sp.get('utility') or 0) >= g['target'] else 'NOT MET'}"
            f"; without the Booster's model/optimizer writes {_fmt_x(sp.get('utility_without_booster')).strip()}, "
            f"and without the VAE encodes too {_fmt_x(sp.get('utility_own')).strip()}; whole step "
            f"{_fmt_x(sp.get('step')).strip()}"
        )
    if doc.get("fused_column"):
        lines.append(f"fused optimizer column: {doc['fused_column']}")
    for key in ("sample_output", "json_path", "png_path"):
        if doc.get(key):
            lines.append(f"{key.replace('_', ' ')}: {doc[key]}")
    return "\n".join(lines)


def op_benchmark_ratios(out_dir: str, slug: str) -> dict:
    """baseline/ours median ratios per group from the newest
    ``<out_dir>/<slug>-<date>.json`` that ``make bench`` wrote (empty when none)."""
    paths = sorted(p for p in glob.glob(os.path.join(out_dir, f"{slug}-*.json")) if "demo-" not in os.path.basename(p))
    if not paths:
        return {"source": None, "ratios": {}}
    path = paths[-1]
    try:
        with open(path) as f:
            doc = json.load(f)
        ratios: Dict[str, float] = {}
        for data in doc.get("files", {}).values():
            groups: Dict[str, dict] = {}
            for b in data.get("benchmarks", []):
                role = b.get("extra_info", {}).get("role")
                g = groups.setdefault(b.get("group") or b.get("name"), {})
                if role in ("baseline", "ours") and role not in g:
                    g[role] = b["stats"]["median"]
            for name, g in groups.items():
                if "baseline" in g and g.get("ours"):
                    ratios[name] = g["baseline"] / g["ours"]
        return {"source": path, "ratios": ratios}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"source": path, "ratios": {}, "error": f"could not read it: {e}"}


def _replace_into(final: str, write) -> None:
    """``write(tmp_path)`` then rename onto ``final``; the temporary file goes on failure."""
    d = os.path.dirname(os.path.abspath(final))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(final) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the result is an ordinary file
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(doc: dict, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)

    _replace_into(path, write)


def write_chart(doc: dict, path: str) -> None:
    """Per-phase ms/step side by side (left) and the op benchmark ratios (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["runs"])
    phases = [p for p in PHASES if p not in ("data", "encode")]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(keys)
    colors = ["#8c8c8c", "#1f77b4", "#2ca02c"]
    for i, k in enumerate(keys):
        r = doc["runs"][k]
        vals = [r["phases"][p]["mean_ms" if p == "checkpoint" else "median_ms"] for p in phases]
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(phases))]
        ax.bar(xs, vals, width, label=r["label"], color=colors[i % len(colors)])
    ax.set_xticks(range(len(phases)))
    ax.set_xticklabels(
        [p + ("\n(per save)" if p == "checkpoint" else "") + (" *" if p in UTILITY else "") for p in phases], fontsize=8
    )
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median; log scale)")
    g = doc["goal"]
    sp = "n/a" if g["utility_speedup"] is None else f"{g['utility_speedup']:.2f}x"
    ax.set_title(f"demo, size {doc['size']['name']} on {doc['device']}: utility phases (*) {sp} faster", fontsize=10)
    ax.legend(fontsize=8)
    ops = doc.get("op_benchmarks", {}).get("ratios", {})
    if ops:
        names = list(ops)
        bx.barh(range(len(names)), [ops[n] for n in names], color="#1f77b4")
        bx.set_yticks(range(len(names)))
        bx.set_yticklabels([n if len(n) <= 48 else n[:45] + "..." for n in names], fontsize=6)
        bx.axvline(1.0, color="k", lw=0.8)
        bx.set_xscale("log")
        bx.set_xlabel("op benchmark: upstream-faithful / opensora_fast (median)")
        bx.invert_yaxis()
    else:
        bx.axis("off")
        bx.text(
            0.5,
            0.5,
            "no op benchmark results for this machine\n(make bench writes them)",
            ha="center",
            va="center",
            fontsize=10,
        )
    fig.suptitle(doc["machine"], fontsize=8)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=110)

    try:
        _replace_into(path, write)
    finally:
        plt.close(fig)


def _frames_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def save_sample(video: torch.Tensor, stem: str, fps: int = 8) -> tuple[str, str]:
    """An mp4 through PyAV when it imports, else PNG frames through Pillow; returns
    (path, what was written)."""
    frames = _frames_uint8(video)
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        path = stem + ".mp4"

        def write(tmp):
            with av.open(tmp, "w", format="mp4") as c:
                try:
                    s = c.add_stream("libx264", rate=fps)
                except Exception:
                    s = c.add_stream("mpeg4", rate=fps)
                s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
                for fr in frames.numpy():
                    for pkt in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                        c.mux(pkt)
                for pkt in s.encode():
                    c.mux(pkt)

        _replace_into(path, write)
        return path, f"mp4 ({frames.shape[0]} frames, PyAV)"
    try:
        from PIL import Image
    except ImportError:
        return "", "nothing: neither PyAV nor Pillow is installed (pip install 'opensora_fast[video]')"
    final = stem + "-frames"
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(final) + ".", dir=os.path.dirname(os.path.abspath(final)))
    try:
        for i, fr in enumerate(frames.numpy()):
            Image.fromarray(fr).save(os.path.join(tmp, f"{i:04d}.png"))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, f"PNG frames ({frames.shape[0]}, Pillow; PyAV not installed, so no mp4)"
