"""The benchmark sections. Each takes a `Ctx` (and what earlier sections measured) and returns a
JSON-able dict. Models are untrained: speed depends on shapes, not on weights.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_common import (N_CODES, N_LEVELS, PROMPT_FRAMES, TEXT_PER_SECOND, Ctx, backbone_bytes, best_of,
                          build_codec_for, build_model, build_tts, compiler_available, load_average, random_inputs, reference_input,
                          reset_peak_rss, rss_mb, settings_for_frames, speech, summarize, sync, text_for_seconds, timed,
                          tiny_encodec, world_codec)

FRAME_RATE = 75


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to(xs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [x.to(device) for x in xs]


# ---------------------------------------------------------------------------------------- bandwidth


def bandwidth(ctx: Ctx) -> dict[str, Any]:
    """Memory bandwidth with the run's thread count: a large sum (read), copy (read + write) and a
    matrix-vector product (the decode step's access pattern: stream a weight matrix once)."""
    mib = 2048 if ctx.cuda else (128 if ctx.quick else 256)
    n = mib * (1 << 20) // 4
    a = torch.ones(n, device=ctx.device)
    b = torch.empty_like(a)
    side = int(n ** 0.5)
    w = a[: side * side].view(side, side)
    x = torch.ones(side, device=ctx.device)
    reps = 5
    read = best_of(lambda: a.sum(), ctx.device, reps)["best_s"]
    copy = best_of(lambda: b.copy_(a), ctx.device, reps)["best_s"]
    gemv = best_of(lambda: torch.mv(w, x), ctx.device, reps)["best_s"]
    out = {"buffer_mib": mib, "read_gbps": n * 4 / read / 1e9, "copy_gbps": 2 * n * 4 / copy / 1e9,
           "gemv_gbps": side * side * 4 / gemv / 1e9}
    out["bound_gbps"] = max(out["read_gbps"], out["gemv_gbps"])  # the best read rate we could reach
    del a, b, w, x
    # arithmetic peak for reference: a large matrix product in the run's dtype
    n = 8192 if ctx.cuda else 2048
    m1 = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    t = best_of(lambda: m1 @ m1, ctx.device, 3)["best_s"]
    out["gemm_gflops"] = 2 * n**3 / t / 1e9
    del m1
    _free()
    return out


# ---------------------------------------------------------------------------------------- AR decode


@torch.inference_mode()
def cached_decode(model: Any, text: list[torch.Tensor], prompt: list[torch.Tensor], n_tokens: int,
                  device: torch.device) -> dict[str, Any]:
    """Greedy KV-cached decode of `n_tokens` frames: prefill (gives frame 1) + n_tokens - 1 steps.

    Per-step times are taken with a device sync after each step (the engine syncs every step too).
    """
    sync(device)
    t0 = time.perf_counter()
    logits, state = model.ar_prefill(text, None, prompt, max_length=n_tokens)
    tok = logits[:, :N_CODES].argmax(-1)
    sync(device)
    prefill = time.perf_counter() - t0
    P = state.length
    steps = []
    for _ in range(n_tokens - 1):
        t = time.perf_counter()
        logits, state = model.ar_step(tok, state)
        tok = logits[:, :N_CODES].argmax(-1)
        sync(device)
        steps.append(time.perf_counter() - t)
    return {"prefill_s": prefill, "steps_s": steps, "prefix_len": P}


def best_decode(model: Any, text: list[torch.Tensor], prompt: list[torch.Tensor], n_tokens: int,
                device: torch.device, runs: int) -> dict[str, Any]:
    """`runs` cached decodes combined step by step: each step's (and the prefill's) best time.

    On a shared machine another process can stall any step; it is unlikely to stall the same step in
    every run, so the per-step minimum is close to what an idle machine would give. With runs=1 it
    is the plain measurement.
    """
    return combine_decodes([cached_decode(model, text, prompt, n_tokens, device) for _ in range(max(1, runs))])


def combine_decodes(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """`cached_decode` results of the same decode combined step by step (each step's best time)."""
    return {"prefill_s": min(r["prefill_s"] for r in rs), "steps_s": [min(t) for t in zip(*(r["steps_s"] for r in rs))],
            "prefix_len": rs[0]["prefix_len"], "runs": len(rs),
            "run_totals_s": [r["prefill_s"] + sum(r["steps_s"]) for r in rs]}


@torch.inference_mode()
def full_recompute_step(model: Any, text: list[torch.Tensor], prompt: list[torch.Tensor], codes: torch.Tensor) -> Any:
    """One AR step the reference's way: the whole sequence again, the last row's argmax."""
    return model.ar_full(text, None, prompt, [codes])[0][-1, :N_CODES].argmax()


def _interp_total(points: dict[int, float], n_tokens: int) -> float:
    """Sum over t = 0..n_tokens-1 of the per-step cost c(t), linear between measured points."""
    xs = sorted(points)
    total = 0.0
    for t in range(n_tokens):
        if t <= xs[0]:
            total += points[xs[0]]
            continue
        hi = next((x for x in xs if x >= t), xs[-1])
        lo = max(x for x in xs if x <= t) if t <= xs[-1] else xs[-2]
        if hi == lo:
            total += points[lo]
        else:  # interpolate (or extrapolate past the last point along the last segment)
            total += points[lo] + (points[hi] - points[lo]) * (t - lo) / (hi - lo)
    return total


def _window(steps: list[float], token: int, half: int = 10) -> float:
    """Median time of the steps producing tokens around `token` (step i produces token i + 2)."""
    i = max(0, token - 2)
    lo, hi = max(0, i - half), min(len(steps), i + half + 1)
    return statistics.median(steps[lo:hi])


def _kv_bytes(model: Any, keys: int, batch: int = 1) -> int:
    c = model.config
    elt = next(model.parameters()).element_size()
    kv_width = c.d_model // c.n_heads * (c.kv_heads or c.n_heads)  # grouped-query attention: fewer kv heads
    return 2 * c.n_layers * batch * keys * kv_width * elt


def _step_bytes(model: Any, keys: int, batch: int = 1) -> int:
    """Bytes one decode step must read at least: every backbone weight, the AR head, one embedding row
    per sample and the whole KV cache (keys = cached positions attended to)."""
    head = sum(p.numel() * p.element_size() for p in model.ar_head.parameters())
    row = model.config.d_model * next(model.parameters()).element_size() * batch
    return backbone_bytes(model) + head + row + _kv_bytes(model, keys, batch)


def _forward_flops(model: Any, positions: int, scored: int) -> float:
    """Multiply-adds x 2 of one full forward: backbone matmuls, attention (QK^T and AV over all
    positions, bidirectional) and one head over the `scored` positions."""
    c = model.config
    dense = 2 * positions * sum(p.numel() for n, p in model.backbone.named_parameters() if p.dim() == 2)
    attention = 4 * positions * positions * c.d_model * c.n_layers
    return dense + attention + 2 * scored * c.d_model * c.n_codes


def ar_decode(ctx: Ctx, bw: dict[str, Any] | None) -> dict[str, Any]:
    lengths = [75, 375, 750] if ctx.quick else [75, 375, 750, 1500]
    presets = ["quarter", "half"]
    n_text = 60
    out: dict[str, Any] = {"lengths": lengths, "n_text": n_text, "prompt_frames": PROMPT_FRAMES,
                           "sampling": "greedy argmax over the codes (STOP excluded), batch 1"}
    for preset in presets:
        ctx.log(f"  AR decode, {preset}")
        model = build_model(preset, ctx)
        text, prompt = random_inputs(n_text)
        text, prompt = _to(text, ctx.device), _to(prompt, ctx.device)
        cached_decode(model, text, prompt, 20, ctx.device)  # warm-up
        L = max(lengths)
        run = best_decode(model, text, prompt, L, ctx.device, 2 if ctx.quick else 3)
        steps, P = run["steps_s"], run["prefix_len"]
        res: dict[str, Any] = {"params_backbone_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
                               "prefix_len": P, "prefill_s": run["prefill_s"], "cached_runs": run["runs"],
                               "cached_run_totals_s": run["run_totals_s"], "cached": {}, "full": {}}
        for n in lengths:
            total = run["prefill_s"] + sum(steps[: n - 1])
            res["cached"][n] = {"total_s": total, "tokens_per_s": n / total,
                                "decode_tokens_per_s": (n - 1) / sum(steps[: n - 1])}
        res["per_token_ms"] = {"at_10": 1e3 * _window(steps, 10), f"at_{L}": 1e3 * _window(steps, L)}
        res["per_token_ratio"] = _window(steps, L) / _window(steps, 10)
        res["per_token_ratio_at"] = L

        # full recompute: time single steps at sampled lengths, integrate between them
        codes = torch.randint(0, N_CODES, (L,), device=ctx.device)
        points = sorted({0, 9, *(n - 1 for n in lengths)})
        cost: dict[int, float] = {}
        full_recompute_step(model, text, prompt, codes[:0])  # warm-up
        for t in points:
            reps = 2 if (ctx.quick or t > 800) else 3
            cost[t] = best_of(lambda: full_recompute_step(model, text, prompt, codes[:t]), ctx.device, reps,
                              warmup=0)["best_s"]
        res["full"]["step_s_at"] = cost
        for n in lengths:
            total = _interp_total(cost, n)
            res["full"][n] = {"total_s": total, "tokens_per_s": n / total, "estimated": True}
            res["cached"][n]["speedup_vs_full"] = total / res["cached"][n]["total_s"]
        if not ctx.quick and preset == "quarter":  # check the estimate against a real full-recompute loop
            n = lengths[0]
            real, _ = timed(lambda: [full_recompute_step(model, text, prompt, codes[:t]) for t in range(n)], ctx.device)
            res["full"]["measured_total_s_75"] = real
            res["full"]["estimate_error_75"] = _interp_total(cost, n) / real - 1

        # share of the memory-bandwidth bound over the decode steps
        if bw:
            gbps = bw["bound_gbps"]
            bound = sum(_step_bytes(model, P + i + 1) for i in range(len(steps))) / (gbps * 1e9)
            res["bandwidth"] = {"bytes_per_token_mb_at_start": _step_bytes(model, P + 1) / 1e6,
                                "bytes_per_token_mb_at_end": _step_bytes(model, P + L) / 1e6,
                                "bound_ms_per_token_mean": 1e3 * bound / len(steps),
                                "achieved_ms_per_token_mean": 1e3 * sum(steps) / len(steps),
                                "achieved_over_bound": bound / sum(steps)}
        out[preset] = res
        del model
        _free()
    return out


def profile_steps(model: Any, text: list[torch.Tensor], prompt: list[torch.Tensor], ctx: Ctx, n: int = 20,
                  advance: int = 20, top: int = 12) -> dict[str, Any]:
    """torch.profiler over `n` greedy decode steps after `advance` unprofiled ones: the top ops by self
    time per step, and the share of the step in attention and in the linears."""
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
        with torch.inference_mode():
            logits, state = model.ar_prefill(text, None, prompt, max_length=advance + n + 2)
            tok = logits[:, :N_CODES].argmax(-1)
            for _ in range(advance):
                logits, state = model.ar_step(tok, state)
                tok = logits[:, :N_CODES].argmax(-1)
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(n):
                    logits, state = model.ar_step(tok, state)
                    tok = logits[:, :N_CODES].argmax(-1)
                sync(ctx.device)
                wall = time.perf_counter() - t0
            keys = state.length
        events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) or 1.0
        share = lambda names: sum(e.self_cpu_time_total for e in events if e.key in names) / total  # noqa: E731
        return {"profile_top_ops": [{"op": e.key, "calls_per_step": e.count / n,
                                     "self_cpu_us_per_step": e.self_cpu_time_total / n} for e in events[:top]],
                "profile_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) / n,
                "profile_wall_ms_per_step": 1e3 * wall / n,  # with profiler overhead
                "profile_keys": keys,
                "profile_share_attention": share({"aten::_scaled_dot_product_flash_attention_for_cpu",
                                                  "aten::_scaled_dot_product_efficient_attention",
                                                  "aten::_scaled_dot_product_flash_attention"}),
                "profile_share_linears": share({"aten::mm", "aten::addmm"})}
    except Exception as e:  # noqa: BLE001 - the profiler is optional
        return {"profile_error": f"{type(e).__name__}: {e}"}


def overhead(ctx: Ctx) -> dict[str, Any]:
    """Where a decode step's time goes at small sizes.

    * A 12-layer model at d=64 does next to no arithmetic: its step time is the per-step fixed
      cost (Python, dispatch, small-op launches) of any 12-layer model.
    * torch.profiler over quarter-preset steps: the top ops by self time.
    """
    from vall_e.models.valle import VALLE, VALLEConfig

    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = VALLE(VALLEConfig(d_model=64, n_heads=4, n_layers=12, n_text_tokens=256, dropout=0.0))
    probe = probe.to(ctx.device, ctx.dtype).eval()
    if ctx.device.type == "cpu":  # as build_model does for every inference model
        from vall_e.generation.tts import cpu_decode_layout

        cpu_decode_layout(probe)
    text, prompt = random_inputs(60)
    text, prompt = _to(text, ctx.device), _to(prompt, ctx.device)
    run = best_decode(probe, text, prompt, 200, ctx.device, 3)
    out["fixed_cost_ms_per_step_12_layers"] = 1e3 * statistics.median(run["steps_s"][50:])
    del probe

    model = build_model("quarter", ctx)
    run = best_decode(model, text, prompt, 200, ctx.device, 3)
    step_ms = 1e3 * statistics.median(run["steps_s"][50:])
    out["quarter_ms_per_step"] = step_ms
    out["fixed_cost_share_of_quarter_step"] = out["fixed_cost_ms_per_step_12_layers"] / step_ms
    out.update(profile_steps(model, text, prompt, ctx))
    del model
    _free()
    return out


# ---------------------------------------------------------------------------------------- NAR, E2E


def nar(ctx: Ctx) -> dict[str, Any]:
    seconds = [1, 5, 10] if ctx.quick else [1, 5, 10, 20]
    presets = ["quarter"] if ctx.quick else ["quarter", "half"]
    from vall_e.generation.sampling import SamplingParams

    out: dict[str, Any] = {"seconds": seconds, "passes": N_LEVELS - 1}
    params = SamplingParams.nar_defaults(seed=0)
    for preset in presets:
        tts = build_tts(preset, ctx, codec=None)
        res = {}
        for s in seconds:
            frames = s * FRAME_RATE
            text, prompt = random_inputs(int(TEXT_PER_SECOND * s), seed=s)
            level0 = [torch.randint(0, N_CODES, (frames,))]
            langs = torch.zeros(1, dtype=torch.long)
            fn = lambda: tts.generate_nar(text, langs, prompt, level0, params, N_LEVELS - 1)  # noqa: E731
            t = best_of(fn, ctx.device, 1 if (ctx.quick or s >= 20) else 2, warmup=1 if s == seconds[0] else 0)
            gflop = (N_LEVELS - 1) * _forward_flops(tts.nar_model, len(text[0]) + PROMPT_FRAMES + frames + 4, frames) / 1e9
            res[s] = {**t, "frames": frames, "rtf": t["best_s"] / s, "gflop": gflop, "gflops": gflop / t["best_s"]}
        out[preset] = res
        del tts
        _free()
    if not ctx.cuda:
        out["int8_10s"] = _nar_int8(ctx, params)
    return out


def _nar_int8(ctx: Ctx, params: Any) -> dict[str, Any]:
    """The quarter NAR at 10 s with int8 dynamic weights (`TTS(dtype="int8")`) beside float32, and
    how far its codes and logits are from float32's (same inputs and seeds). The models are
    untrained, so their logits are nearly flat and code agreement is a harsh test; see the README
    for the same comparison on a trained model."""
    s = 10
    frames = s * FRAME_RATE
    text, prompt = random_inputs(int(TEXT_PER_SECOND * s), seed=s)
    level0 = [torch.randint(0, N_CODES, (frames,))]
    langs = torch.zeros(1, dtype=torch.long)
    out: dict[str, Any] = {}
    codes, logits = {}, {}
    for kind in ("float32", "int8"):
        tts = build_tts("quarter", ctx, codec=None, dtype=kind)
        fn = lambda: tts.generate_nar(text, langs, prompt, level0, params, N_LEVELS - 1)  # noqa: E731
        out[kind] = best_of(fn, ctx.device, 1 if ctx.quick else 2, warmup=1)
        codes[kind] = fn()[0]
        with torch.inference_mode():  # one pass's logits, teacher-forced on the float32 codes
            logits[kind] = tts.nar_model.nar_pass(text, None, prompt, [codes["float32"]], 3)[0].float()
        del tts
        _free()
    out["speedup"] = out["float32"]["best_s"] / out["int8"]["best_s"]
    out["codes_agreement"] = (codes["int8"][:, 1:] == codes["float32"][:, 1:]).float().mean().item()
    ref = logits["float32"]
    out["logit_argmax_agreement_level3"] = (logits["int8"].argmax(-1) == ref.argmax(-1)).float().mean().item()
    out["logit_mean_abs_error_over_std_level3"] = ((logits["int8"] - ref).abs().mean() / ref.std()).item()
    return out


def _e2e_measure(tts: Any, ref: Any, ctx: Ctx) -> Any:
    """A function (seconds, repeats) -> the best of `repeats` timed `synthesize` calls with per-stage times."""
    stages: dict[str, float] = defaultdict(float)
    ar_frames: list[int] = []

    def wrap(name: str) -> None:
        orig = getattr(tts, name)

        def f(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            r = orig(*a, **k)
            sync(ctx.device)
            stages[name] += time.perf_counter() - t0
            if name == "generate_ar":
                ar_frames[:] = [int(x.shape[0]) for x in r]
            return r

        setattr(tts, name, f)

    for name in ("encode_text", "encode_reference", "generate_ar", "generate_nar", "decode"):
        wrap(name)

    def measure(seconds: float, repeats: int) -> dict[str, Any]:
        text = text_for_seconds(seconds)
        frames = int(seconds * FRAME_RATE)
        best: dict[str, Any] | None = None
        for _ in range(repeats):  # best of n: less disturbed by other processes
            stages.clear()
            t, wavs = timed(lambda: tts.synthesize(text, ref, settings_for_frames(frames)), ctx.device)
            audio_s = wavs[0].shape[0] / tts.sample_rate
            if best is None or t < best["total_s"]:
                best = {"total_s": t, "audio_s": audio_s, "rtf": t / audio_s, "ar_frames": ar_frames[0],
                        "text_chars": len(text), "stages_s": dict(stages)}
        assert best is not None
        return best

    return measure


def end_to_end(ctx: Ctx) -> dict[str, Any]:
    """Text + a 3 s reference wav -> waveform through `TTS.synthesize` (quarter preset).

    Not counted: model load. Counted: G2P, reference encoding, AR, NAR, codec decode. The AR length
    is forced (STOP banned, max_ar_steps = frames) so each output is exactly as long as asked.
    Labelled extra rows at 10 s: int8 weights (CPU) and a torch.compile'd AR step (its compile time
    is reported apart, not counted in the row).
    """
    seconds = [1, 5, 10] if ctx.quick else [1, 5, 10, 20]
    codec, fallback = build_codec_for(ctx)
    ref, ref_kind = reference_input(codec.sample_rate)
    tts = build_tts("quarter", ctx, codec, with_g2p=True)
    measure = _e2e_measure(tts, ref, ctx)
    out: dict[str, Any] = {"preset": "quarter", "codec": codec.name, "reference": ref_kind,
                           "sampling": "AR defaults (T=0.95, RAS), NAR defaults (T=0.2)", "seconds": {}}
    if fallback:
        out["world_codec_error"] = fallback
        out["codec_note"] = "the WORLD codec could not be built here, so the tiny EnCodec stands in"
    measure(1, 1)  # warm-up
    for s in seconds:
        out["seconds"][s] = measure(s, 1 if (ctx.quick or s >= 20) else 2)
    del tts
    _free()

    variants: dict[str, Any] = {}
    kinds = ([] if ctx.cuda else ["int8"]) + (["compiled"] if ctx.compile and (ctx.cuda or compiler_available()) else [])
    for kind in kinds:
        try:
            tts = build_tts("quarter", ctx, codec, with_g2p=True, dtype="int8" if kind == "int8" else None,
                            compile=kind == "compiled")
            measure = _e2e_measure(tts, ref, ctx)
            t0 = time.perf_counter()
            measure(1, 1)  # warm-up; compiles the decode step for the compiled row
            first = time.perf_counter() - t0
            row = measure(10, 1 if ctx.quick else 2)
            if kind == "compiled":
                row["compile_s"] = first  # the warm-up call, compilation included (not in total_s)
            variants[kind] = row
            del tts
            _free()
        except Exception as e:  # noqa: BLE001 - a variant this machine cannot run is reported, not fatal
            variants[kind] = {"error": f"{type(e).__name__}: {e}"}
    if variants:
        out["variants_10s"] = variants
    return out


# ---------------------------------------------------------------------------------------- batching


def batch(ctx: Ctx) -> dict[str, Any]:
    """Aggregate AR tokens/s at batch 1, 4, 16 (quarter), through the engine (sampling included) and
    through the bare model (greedy).

    The batch sizes take turns (1, 4, 16, 1, 4, 16, ...) and each keeps its best round, so every
    ratio compares runs made minutes apart at most: on a shared machine, one block of batch-1 runs
    followed by one block of batch-16 runs gave ratios 20% apart from one full run to the next.
    """
    from vall_e.generation.sampling import SamplingParams

    n = 150 if ctx.quick else 375
    sizes = [1, 4, 16]
    rounds = 2 if ctx.quick else 3
    tts = build_tts("quarter", ctx, codec=None)
    params = SamplingParams.ar_defaults(seed=0)
    out: dict[str, Any] = {"tokens_per_sequence": n, "preset": "quarter", "rounds": rounds,
                           "order": "batch sizes interleaved, best round each", "engine": {}, "model": {}}
    inputs = {}
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        text = [torch.randint(1, 200, (int(torch.randint(40, 81, (1,), generator=g)),), generator=g) for _ in range(b)]
        _, prompt = random_inputs(1, batch=b, seed=b)
        inputs[b] = (text, prompt)
        tts.generate_ar(text, torch.zeros(b, dtype=torch.long), prompt, params, [10] * b, 100)  # warm-up
    engine_times: dict[int, list[float]] = {b: [] for b in sizes}
    model_runs: dict[int, list[dict[str, Any]]] = {b: [] for b in sizes}
    for _ in range(rounds):
        for b in sizes:
            text, prompt = inputs[b]
            langs = torch.zeros(b, dtype=torch.long)
            engine_times[b].append(timed(lambda: tts.generate_ar(text, langs, prompt, params, [n] * b, 10 * n),
                                         ctx.device)[0])
            model_runs[b].append(cached_decode(tts.ar_model, _to(text, ctx.device), _to(prompt, ctx.device), n,
                                               ctx.device))
    for b in sizes:
        t = summarize(engine_times[b])
        out["engine"][b] = {**t, "tokens_per_s": b * n / t["best_s"]}
        r = combine_decodes(model_runs[b])
        total = r["prefill_s"] + sum(r["steps_s"])
        out["model"][b] = {"best_s": total, "tokens_per_s": b * n / total}
        keys = r["prefix_len"] + n // 2  # mean attended length over the decode
        out["model"][b]["bytes_per_step_mb"] = _step_bytes(tts.ar_model, keys, b) / 1e6
    # Where a batch-16 step's time goes, midway through the decode.
    text, prompt = inputs[sizes[-1]]
    out["model"][sizes[-1]].update(profile_steps(tts.ar_model, _to(text, ctx.device), _to(prompt, ctx.device), ctx,
                                                 advance=n // 2, top=8))
    # If a step were bound by memory traffic alone, batch b would gain b x bytes(1) / bytes(b): the
    # weights are read once for the whole batch, but every sequence reads its own KV cache.
    one = out["model"][1]["bytes_per_step_mb"]
    out["bandwidth_model_speedup"] = {b: b * one / out["model"][b]["bytes_per_step_mb"] for b in sizes}
    for kind in ("engine", "model"):
        base = out[kind][1]["tokens_per_s"]
        for b in sizes:
            out[kind][b]["vs_batch_1"] = out[kind][b]["tokens_per_s"] / base
    del tts
    _free()
    return out


# ---------------------------------------------------------------------------------------- training


# Issue 16's protocol, and the reference implementation's figures measured with it on this 2-core
# machine (mrq/vall-e's own transformer and llama at the quarter preset; not re-run by this benchmark).
TRAIN_PROTOCOL = {"preset": "quarter", "batch_size": 8, "n_text": 60, "prompt_frames": 225, "response_frames": 375,
                  "dropout": 0.1, "optimizer": "AdamW lr 1e-4", "levels": [0, 3, 5, 7, 1, 2, 4, 6],
                  "batch": "the same batch every step"}
REFERENCE_TRAIN = {"transformer": {"params_m": 14.2, "step_s": 7.70, "positions_per_s": 686, "peak_rss_mb": 3070},
                   "llama": {"params_m": 17.6, "step_s": 5.46, "positions_per_s": 967, "peak_rss_mb": 6320}}


def _train_protocol(backbone: str, device: str, dtype: str, threads: int, steps: int,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """One backbone under TRAIN_PROTOCOL, in its own process (so peak RSS is its own): a warm-up step,
    then `steps` timed steps of VALLE.forward + backward + AdamW."""
    torch.set_num_threads(threads)
    ctx = Ctx(device=torch.device(device), dtype=getattr(torch, dtype), threads=threads, quick=False, codec="world",
              log=print, compile=False)
    P = TRAIN_PROTOCOL
    B, n_text, n_prompt, n_resp = P["batch_size"], P["n_text"], P["prompt_frames"], P["response_frames"]
    g = torch.Generator().manual_seed(0)
    batch = {"text": [torch.randint(1, 256, (n_text,), generator=g) for _ in range(B)],
             "prompt": [torch.randint(0, N_CODES, (n_prompt, N_LEVELS), generator=g) for _ in range(B)],
             "resps": [torch.randint(0, N_CODES, (n_resp, N_LEVELS), generator=g) for _ in range(B)],
             "levels": torch.tensor(P["levels"][:B])}
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    rss0 = rss_mb()
    model = build_model(P["preset"], ctx, dropout=P["dropout"], ban_stop=False, train=True, backbone=backbone, **extra)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.dtype == torch.bfloat16):
            loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # warm-up (allocates the optimizer state)
    times = [timed(step, ctx.device)[0] for _ in range(steps)]
    best = min(times)
    positions = B * (n_text + n_prompt + n_resp + 4)
    res = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_s": times, "step_s_best": best,
           "tokens_per_s": B * (n_text + n_resp) / best, "positions_per_s": positions / best,
           "rss_before_mb": rss0, "peak_rss_mb": rss_mb("VmHWM"), "config": extra}
    if ctx.cuda:
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return res


def training(ctx: Ctx) -> dict[str, Any]:
    """Training speed and memory under issue 16's protocol (TRAIN_PROTOCOL), per backbone, each in a
    fresh process, beside the reference's figures (REFERENCE_TRAIN).

    tokens = text + response frames per sample (the trainer's count); positions = the whole sequence
    (text, separators, prompt, response) that the backbone processes. The `_with_attention_dropout`
    row is the default before issue 16 (attention dropout = dropout), for comparison.
    """
    import multiprocessing

    steps = 2 if ctx.quick else 3
    runs = {"transformer": ("transformer", {}), "llama": ("llama", {})}
    if not ctx.quick:
        runs["transformer_with_attention_dropout"] = ("transformer", {"attention_dropout": 0.1})
    out: dict[str, Any] = {"protocol": TRAIN_PROTOCOL, "timed_steps": steps, "reference": REFERENCE_TRAIN,
                           "precision": "bf16 autocast" if ctx.dtype == torch.bfloat16 else "fp32"}
    spawn = multiprocessing.get_context("spawn")
    for name, (backbone, extra) in runs.items():
        with spawn.Pool(1) as pool:
            out[name] = pool.apply(_train_protocol, (backbone, str(ctx.device), str(ctx.dtype).replace("torch.", ""),
                                                     ctx.threads, steps, extra))
        ref = REFERENCE_TRAIN.get(backbone)
        if ref and not extra:
            out[name]["positions_per_s_vs_reference"] = out[name]["positions_per_s"] / ref["positions_per_s"]
        ctx.log(f"[train] {name}: {out[name]['step_s_best']:.2f} s/step, {out[name]['positions_per_s']:.0f} positions/s, "
                f"peak RSS {out[name]['peak_rss_mb']:.0f} MB")
    return out


# ---------------------------------------------------------------------------------------- GQA


def gqa(ctx: Ctx) -> dict[str, Any]:
    """Grouped-query attention: AR tokens/s of the same preset with kv_heads = n_heads and n_heads / 4
    at batch 1 and 16 (bare model, greedy; on a GPU through the static decode path when compiled),
    interleaved rounds, best round each; plus the KV cache each holds at the end of the decode."""
    from vall_e.config.model import resolve_dims

    n = 150 if ctx.quick else 375
    rounds = 2 if ctx.quick else 3
    presets = ["quarter"] if ctx.quick else ["quarter", "half"]
    sizes = [1, 16]
    out: dict[str, Any] = {"tokens_per_sequence": n, "rounds": rounds, "batch_sizes": sizes}
    inputs = {}
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        text = [torch.randint(1, 200, (int(torch.randint(40, 81, (1,), generator=g)),), generator=g) for _ in range(b)]
        _, prompt = random_inputs(1, batch=b, seed=b)
        inputs[b] = (_to(text, ctx.device), _to(prompt, ctx.device))
    for preset in presets:
        _, h, _ = resolve_dims(preset)
        models = {kv: build_model(preset, ctx, kv_heads=kv) for kv in (h, max(1, h // 4))}
        runs: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for kv, m in models.items():
            cached_decode(m, *inputs[1], 10, ctx.device)  # warm-up
        for _ in range(rounds):
            for b in sizes:
                for kv, m in models.items():
                    runs[(kv, b)].append(cached_decode(m, *inputs[b], n, ctx.device))
        res: dict[str, Any] = {}
        for (kv, b), rs in runs.items():
            r = combine_decodes(rs)
            total = r["prefill_s"] + sum(r["steps_s"])
            m = models[kv]
            res.setdefault(f"kv_heads_{kv}", {"params_m": sum(p.numel() for p in m.parameters()) / 1e6})[f"batch_{b}"] = {
                "tokens_per_s": b * n / total, "ms_per_step": 1e3 * sum(r["steps_s"]) / len(r["steps_s"]),
                "kv_cache_mb_at_end": _kv_bytes(m, r["prefix_len"] + n, b) / 2**20}
        full, grouped = res[f"kv_heads_{h}"], res[f"kv_heads_{max(1, h // 4)}"]
        for b in sizes:
            grouped[f"batch_{b}"]["speedup_vs_kv_heads_n_heads"] = (grouped[f"batch_{b}"]["tokens_per_s"]
                                                                    / full[f"batch_{b}"]["tokens_per_s"])
        out[preset] = res
        del models
        _free()
    return out


# ---------------------------------------------------------------------------------------- codecs


def codecs(ctx: Ctx) -> dict[str, Any]:
    seconds = 5.0 if ctx.quick else 10.0
    wav = speech(seconds)
    out: dict[str, Any] = {"audio_s": seconds}
    for name, make in (("world", lambda: world_codec(ctx.log)), ("tiny_encodec", lambda: tiny_encodec(ctx))):
        try:
            codec = make()
            enc = best_of(lambda: codec.encode(wav), ctx.device, 2, warmup=1)
            codes = codec.encode(wav)
            dec = best_of(lambda: codec.decode(codes), ctx.device, 2, warmup=1)
            out[name] = {"encode_s": enc["best_s"], "decode_s": dec["best_s"],
                         "encode_x_realtime": seconds / enc["best_s"], "decode_x_realtime": seconds / dec["best_s"],
                         "frames": int(codes.shape[0]), "levels": int(codes.shape[1]),
                         "device": "cpu" if name == "world" else str(ctx.device)}
        except Exception as e:  # noqa: BLE001 - one codec failing must not hide the other's numbers
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ---------------------------------------------------------------------------------------- variants


def variants(ctx: Ctx) -> dict[str, Any]:
    """Decode-step time of other weight formats and of a compiled step, side by side with the run's
    dtype (batch 1, greedy): bf16 weights and KV cache, int8 dynamic quantisation of every nn.Linear
    (CPU only, `TTS(dtype="int8")`), and the run's dtype with the decode step compiled
    (`TTS(compile=True)`; the compile time is reported apart, not in ms_per_token)."""
    n = 120 if ctx.quick else 250
    presets = ["quarter", "half"]
    out: dict[str, Any] = {"tokens": n}
    text, prompt = random_inputs(60)
    text, prompt = _to(text, ctx.device), _to(prompt, ctx.device)
    base_kind = str(ctx.dtype).replace("torch.", "")
    for preset in presets:
        res: dict[str, Any] = {}
        kinds = ["float32", "bfloat16"] + ([] if ctx.cuda else ["int8_dynamic"])
        if ctx.compile and (ctx.cuda or compiler_available()):
            kinds.append(f"{base_kind}+compile")
        for kind in kinds:
            try:
                extra: dict[str, Any] = {}
                if kind == "int8_dynamic":
                    from vall_e.generation.tts import quantize_int8

                    model = quantize_int8(build_model(preset, ctx, dtype=torch.float32))
                elif kind.endswith("+compile"):
                    model = build_model(preset, ctx)
                    model.backbone.compile_decode()
                    t0 = time.perf_counter()
                    cached_decode(model, text, prompt, 10, ctx.device)  # compiles
                    extra["compile_s"] = time.perf_counter() - t0
                else:
                    model = build_model(preset, ctx, dtype=getattr(torch, kind))
                cached_decode(model, text, prompt, 10, ctx.device)  # warm-up
                r = best_decode(model, text, prompt, n, ctx.device, 2 if ctx.quick else 3)
                res[kind] = {"ms_per_token": 1e3 * sum(r["steps_s"]) / len(r["steps_s"]),
                             "ms_per_token_median": 1e3 * statistics.median(r["steps_s"]), **extra}
                del model
            except Exception as e:  # noqa: BLE001 - a format this build cannot run is reported, not fatal
                res[kind] = {"error": f"{type(e).__name__}: {e}"}
        base = res.get(base_kind, {}).get("ms_per_token")
        for kind, r in res.items():
            if base and "ms_per_token" in r:
                r[f"speedup_vs_{base_kind}"] = base / r["ms_per_token"]
        out[preset] = res
        _free()
    return out


# ---------------------------------------------------------------------------------------- medusa


def _demo_items(data_dir: Any, frame_rate: float, per_speaker: int = 2, prompt_seconds: float = 1.5
                ) -> list[tuple[str, torch.Tensor]]:
    """(text, prompt codes) pairs from a demo run's held-out Harvard sentences (`DIR/unseen/unseen/<voice>`):
    each sentence with the first `prompt_seconds` of the next sentence of its voice as the prompt."""
    from pathlib import Path

    from vall_e.emb.codes import read_codes
    from vall_e.utils.errors import UserError

    root = Path(data_dir) / "unseen" / "unseen"
    voices = sorted(d for d in root.glob("*") if d.is_dir()) if root.is_dir() else []
    if not voices:
        raise UserError(f"{root}: no voice folders; pass --medusa-data, the output folder of `python -m vall_e.demo`")
    items = []
    for voice in voices:
        texts = sorted(t for t in voice.glob("*.txt") if not t.name.endswith(".phn.txt"))
        for i in range(min(per_speaker, len(texts) - 1)):
            prompt = read_codes(texts[i + 1].with_name(texts[i + 1].name.replace(".txt", ".qnt.pt")))[0]
            items.append((texts[i].read_text().strip(), prompt[: int(prompt_seconds * frame_rate)]))
    return items


# Greedy verification trees the medusa section measures beside the chain (`medusa_tree` settings)
MEDUSA_TREES = ("16,8,4", "16x2,8,4", "32,16,8")


def _verify_cost(ctx: Ctx, K: int, keys: int = 600, trees: tuple[str, ...] = ()) -> dict[str, Any]:
    """Quarter preset (untrained: speed depends on shapes), batch 1, `keys` cache positions: the time of
    one AR step, of one verification pass over K + 1 positions (the backbone's fused block path, and
    for comparison the general forward it replaced), of the K heads on one row, and of a pass over each
    of `trees` (its rows with tree attention)."""
    from vall_e.config.model import resolve_dims
    from vall_e.generation.speculative import parse_tree
    from vall_e.generation.tts import cpu_decode_layout
    from vall_e.models.backbones import transformer as tr
    from vall_e.models.valle import VALLE, VALLEConfig

    d, h, n = resolve_dims("quarter")
    torch.manual_seed(0)
    model = VALLE(VALLEConfig(kind="ar+nar", d_model=d, n_heads=h, n_layers=n, n_text_tokens=256, n_codes=N_CODES,
                              n_levels=N_LEVELS, dropout=0.0, medusa_heads=K)).to(ctx.device, ctx.dtype).eval()
    if ctx.device.type == "cpu":
        cpu_decode_layout(model)
    text, prompt = random_inputs(60, PROMPT_FRAMES)
    with torch.inference_mode():
        _, state = model.ar_prefill(text, None, prompt, max_length=keys + 4 * (K + 1) * 40)
        tok = torch.zeros(1, dtype=torch.long, device=ctx.device)
        while state.length < keys:
            _, state = model.ar_step(tok, state)
        steps = torch.zeros(1, dtype=torch.long, device=ctx.device)
        t_step, t_verify, t_general, t_heads = [], [], [], []
        rows = tr.BLOCK_ROWS
        for _ in range(40):  # interleaved, best of 40; each call is undone so the context stays `keys`
            L = state.length
            t, _ = timed(lambda: model.ar_step(tok, state), ctx.device)
            t_step.append(t)
            model.ar_rollback(state, L)
            t, _ = timed(lambda: model.ar_verify(tok.repeat(1, K + 1), state, steps), ctx.device)
            t_verify.append(t)
            model.ar_rollback(state, L)
            tr.BLOCK_ROWS = 1  # the general forward (what a pass ran through before the block path)
            try:
                t, _ = timed(lambda: model.ar_verify(tok.repeat(1, K + 1), state, steps), ctx.device)
            finally:
                tr.BLOCK_ROWS = rows
            t_general.append(t)
            model.ar_rollback(state, L)
            t, _ = timed(lambda: model.medusa_logits(state.hidden), ctx.device)
            t_heads.append(t)
        t_trees: dict[str, list[float]] = {}
        shapes = {spec: parse_tree(spec, K, ctx.device) for spec in trees}
        for _ in range(10 if trees else 0):
            for spec, tree in shapes.items():
                L = state.length
                t, _ = timed(lambda: model.ar_verify(tok.repeat(1, tree.size), state, steps, tree.block), ctx.device)
                t_trees.setdefault(spec, []).append(t)
                model.ar_rollback(state, L)
    out = {"keys": keys, "step_ms": min(t_step) * 1e3, "verify_ms": min(t_verify) * 1e3,
           "verify_general_ms": min(t_general) * 1e3, "heads_ms": min(t_heads) * 1e3}
    out["pass_over_step"] = (out["verify_ms"] + out["heads_ms"]) / out["step_ms"]
    out["general_pass_over_step"] = (out["verify_general_ms"] + out["heads_ms"]) / out["step_ms"]
    if trees:
        out["trees"] = {spec: {"rows": shapes[spec].size, "verify_ms": min(ts) * 1e3,
                               "pass_over_step": (min(ts) * 1e3 + out["heads_ms"]) / out["step_ms"]}
                        for spec, ts in t_trees.items()}
    return out


def medusa(ctx: Ctx, model_path: Any, data_dir: Any, earlier: dict[str, Any]) -> dict[str, Any]:
    """Medusa decoding against one-step decoding on a trained model with trained heads (the demo's),
    batch 1, interleaved item by item (plain, then Medusa, same text and prompt), best of the rounds
    per item: AR frames/s, steps kept per verification pass, and for greedy whether the codes are
    identical. Then the quarter preset's cost of a verification pass against a step, and the quarter
    end-to-end RTF at 10 s that the demo's acceptance would give, against the single-step floor
    computed from this results file's `ar`, `nar`, `bandwidth` and `e2e` sections."""
    from dataclasses import replace

    from vall_e.generation.sampling import SamplingParams
    from vall_e.generation.tts import TTS
    from vall_e.utils.errors import UserError

    if not model_path:
        raise UserError("the medusa section needs --medusa-model: a model file with trained Medusa heads "
                        "(see README, 'Medusa heads')")
    tts = TTS.from_pretrained(model_path, device=str(ctx.device))
    cfg = tts.ar_model.config
    if not cfg.medusa_heads:
        raise UserError(f"{model_path}: the model has no Medusa heads (model.medusa_heads=0)")
    items = _demo_items(data_dir, tts.codec.frame_rate, per_speaker=1 if ctx.quick else 2)
    rounds = 1 if ctx.quick else 2
    out: dict[str, Any] = {"model": str(model_path), "medusa_heads": cfg.medusa_heads, "ar_group": cfg.ar_group,
                           "d_model": cfg.d_model, "n_layers": cfg.n_layers, "items": len(items), "rounds": rounds,
                           "batch": 1, "threads": ctx.threads}
    modes = {"greedy": SamplingParams(temperature=0.0, seed=0),
             "sampling": SamplingParams.ar_defaults(seed=0)}
    trees = tuple(t for t in MEDUSA_TREES if len(t.split(",")) <= cfg.medusa_heads)
    modes.update({f"tree {t}": SamplingParams(temperature=0.0, seed=0, medusa_tree=t) for t in trees})
    for mode, params in modes.items():
        best: dict[tuple[int, bool], float] = {}
        frames: dict[tuple[int, bool], int] = {}
        passes = kept = 0
        identical = True
        for r in range(rounds):
            for i, (text, prompt) in enumerate(items):
                ids = [tts.encode_text(text)]
                steps = tts._step_limits(ids, 0)
                floors = [int(1.0 * len(ids[0]))]
                codes = {}
                for on in (False, True):  # interleaved: the same item with and without the heads
                    p = replace(params, medusa=on, seed=r)
                    t, c = timed(lambda: tts.generate_ar(ids, torch.zeros(1, dtype=torch.long), [prompt], p, steps,
                                                         150, floors), ctx.device)
                    codes[on] = c[0]
                    best[i, on] = min(best.get((i, on), float("inf")), t)
                    frames[i, on] = int(c[0].shape[0])
                    if on:
                        passes += tts.ar_stats["passes"]
                        kept += tts.ar_stats["steps"]
                if params.greedy:
                    identical &= bool(torch.equal(codes[False], codes[True]))
        row: dict[str, Any] = {}
        for on, name in ((False, "plain"), (True, "medusa")):
            n = sum(frames[i, on] for i in range(len(items)))
            s = sum(best[i, on] for i in range(len(items)))
            row[name] = {"frames": n, "seconds": s, "frames_per_s": n / s}
        row["speedup"] = row["medusa"]["frames_per_s"] / row["plain"]["frames_per_s"]
        row["steps_per_pass"] = kept / max(passes, 1)  # AR steps (groups of ar_group frames) per forward pass
        row["frames_per_pass"] = row["steps_per_pass"] * cfg.ar_group
        if params.greedy:
            row["identical_codes"] = identical
        if params.medusa_tree:
            out.setdefault("trees", {})[params.medusa_tree] = row
        else:
            out[mode] = row
        ctx.log(f"[medusa] {mode}: {row['steps_per_pass']:.2f} steps per pass, speedup {row['speedup']:.2f}x")
    del tts
    _free()

    cost = _verify_cost(ctx, cfg.medusa_heads, trees=trees)
    out["quarter_pass_cost"] = cost
    for t, row in out.get("trees", {}).items():  # what the demo's acceptance would give the quarter's pass costs
        row["quarter_projected_ar_speedup"] = row["steps_per_pass"] / cost["trees"][t]["pass_over_step"]
    e2e = _g(earlier.get("e2e", {}).get("seconds", {}), 10)
    qbw = earlier.get("ar", {}).get("quarter", {}).get("bandwidth")
    n10 = _g(earlier.get("nar", {}).get("quarter", {}), 10)
    gemm = earlier.get("bandwidth", {}).get("gemm_gflops")
    if e2e:
        ar_s = e2e["stages_s"]["generate_ar"]
        proj = {}
        for mode in ("greedy", "sampling"):
            ar_speedup = out[mode]["steps_per_pass"] / cost["pass_over_step"]
            proj[mode] = {"ar_speedup": ar_speedup, "rtf": (e2e["total_s"] - ar_s + ar_s / ar_speedup) / e2e["audio_s"]}
        out["quarter_e2e_10s"] = {"measured_rtf_one_step": e2e["rtf"], "projected_with_heads": proj,
                                  "note": "projection: the e2e section's 10 s run with its AR time divided by the "
                                          "demo's steps per pass over the quarter's pass/step cost (the quarter "
                                          "model is untrained, so its own heads would accept nothing)"}
        if qbw and n10 and gemm:
            floor = (qbw["bound_ms_per_token_mean"] * e2e["ar_frames"] / 1e3 + n10["gflop"] / gemm
                     + sum(v for k, v in e2e["stages_s"].items() if k not in ("generate_ar", "generate_nar")))
            out["quarter_e2e_10s"]["single_step_floor_rtf"] = floor / e2e["audio_s"]
    return out


def _g(d: dict, k: Any) -> Any:
    return d.get(k, d.get(str(k)))


# ---------------------------------------------------------------------------------------- data


def data(ctx: Ctx, utterances: int = 1_000_000, workdir: str | None = None,
         train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset index at scale (issue 18): build, open + filter + sampler, peak RSS per rank,
    random batch reads, sampler state save/restore. Each measurement is a fresh process
    (benchmarks/data_bench.py), so its peak RSS is one rank's; the data goes to a temporary folder
    (`workdir`, default the system's) and is deleted afterwards."""
    import shutil
    import subprocess
    import sys
    import tempfile

    script = str(Path(__file__).resolve().parent / "data_bench.py")
    sparse = utterances > 2_000_000  # real random codes would need ~6.6 GB per million utterances
    tmp = Path(tempfile.mkdtemp(prefix="vall_e_data_bench_", dir=workdir))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> dict[str, Any]:
        p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"data_bench.py {' '.join(args)} failed: {p.stderr.strip()[-2000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    out: dict[str, Any] = {"load_average_start": load_average(), "disk_free_gb": shutil.disk_usage(tmp).free / 1e9}
    try:
        ctx.log(f"[data] generating {utterances} utterances in {tmp}" + (" (sparse codes)" if sparse else ""))
        gen = ["generate", str(tmp), "--utterances", str(utterances)] + (["--sparse-codes"] if sparse else [])
        out["build"] = run(*gen)
        d = str(tmp)
        ranks = range(1) if utterances >= 5_000_000 else range(2)  # the ranks' work is the same: one at 10M
        out["open"] = {f"rank{r}_of_2": run("measure", d, "--what", "open", "--rank", str(r), "--world-size", "2")
                       for r in ranks}
        out["open"]["speaker_sampling"] = run("measure", d, "--what", "open", "--sample-type", "speaker")
        out["open"]["frame_budget_3000"] = run("measure", d, "--what", "open", "--frames-per-batch", "3000")
        out["state"] = run("measure", d, "--what", "state", "--rank", "1", "--world-size", "2",
                           "--frames-per-batch", "3000")
        if not sparse:
            out["read"] = run("measure", d, "--what", "read", "--rank", "0", "--world-size", "2",
                              "--batches", "200" if not ctx.quick else "50")
            step = (train or {}).get("transformer", {}).get("step_s_best")  # the train section's quarter preset
            if step:
                out["read"]["quarter_step_s"] = step
                out["read"]["quarter_step_batch_size"] = (train or {}).get("protocol", {}).get("batch_size")
                out["read"]["batches_read_per_quarter_step"] = out["read"]["batches_per_s"] * step
        worst = max(v["total_s"] for v in out["open"].values())
        worst_cpu = max(v["total_cpu_s"] for v in out["open"].values())
        rss = max(v["peak_rss_mb"] for v in out["open"].values())
        out["summary"] = {"utterances": utterances, "open_filter_sampler_s_max": worst,
                          "open_filter_sampler_cpu_s_max": worst_cpu, "peak_rss_mb_max": rss,
                          "targets_stated_for": "10M utterances: <= 30 s, <= 1536 MB per rank"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_average_end"] = load_average()
    return out
