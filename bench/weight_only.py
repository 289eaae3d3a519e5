"""Weight-only quantization, lowbit's methods and the peers side by side (issue 4's acceptance).

Same float model, same calibration windows (WikiText-2 *validation*), same evaluation
(WikiText-2 raw test, ctx 2048, first --windows windows, GPTQ convention; KLD vs the float
model) for every row. Every quantization runs in its own process, so its wall time and peak
RSS are its own; peers run in their own virtual environments (bench/peers/) and hand back a
de-quantized float directory that lowbit evaluates exactly like its own.

Work is resumable: each quantized directory and each evaluated row is kept under --work, so
a second run only does what is missing; the rows already in --json count as done too, so results
committed from an earlier machine survive a fresh cache.

    python bench/weight_only.py --models smollm2-135m --settings "W4 g64" "W3 g64" \
        --methods rtn gptq awq awq+gptq --samples 32 --windows 20
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CALIB_TEXT, EVAL_TEXT, lowbit_quantize, machine, table, write_json

SETTINGS = {  # label -> (bits, group); symmetric integer grids throughout
    "W4 g128": (4, 128), "W4 g64": (4, 64), "W3 g128": (3, 128), "W3 g64": (3, 64), "W2 g64": (2, 64),
}
# row label -> lowbit quantize flags. awq is AWQ with its defaults: scale candidates mean|x|^α
# and AutoAWQ's weight-aware ones (duo), then AWQ's clip search on the output error, one sweep
# over the groups on the whole error. The other awq rows take parts away: "-x" searches
# mean|x|^α only (--no-duo), "-noclip" has no clip search, "-clip0" judges each group's clip
# alone (--clip-sweeps 0). gptq walks each layer once, solving each group when the calibration
# reaches it (the default walk); gptq-2pass captures the float layer and re-runs it quantized;
# gptq-sink1 takes the textbook Hessian sum xᵀx (no extra weight on the attention-sink token).
# "-signed" rows use --scale-rule signed: all 2^b codes of the symmetric grid (llama.cpp's Q4_0
# rule) instead of absmax's 2^b - 1, at the same bits per weight; gptq-signed-act adds --act-order
# (columns by descending Hessian diagonal, groups kept static, as in the llm-compressor peer rows).
SIGNED = ["--scale-rule", "signed"]
# rows without "-signed" / "-act" are the absmax grid in natural column order: quantize_lowbit pins
# that, since the CLI's defaults became --scale-rule signed and --act-order (the best rows here)
METHODS = {"rtn": ["--method", "rtn"], "gptq": ["--method", "gptq"],
           "gptq-2pass": ["--method", "gptq", "--walk", "two-pass"], "awq": ["--method", "awq"],
           "awq+gptq": ["--method", "awq+gptq"], "gptq-sink1": ["--method", "gptq", "--sink-weight", "1"],
           "awq-noclip": ["--method", "awq", "--clip", "none"], "awq-clip0": ["--method", "awq", "--clip-sweeps", "0"],
           "awq-x": ["--method", "awq", "--no-duo", "--clip", "none"],
           "awq-x-clip0": ["--method", "awq", "--no-duo", "--clip-sweeps", "0"],
           "rtn-signed": ["--method", "rtn", *SIGNED], "gptq-signed": ["--method", "gptq", *SIGNED],
           "awq-signed": ["--method", "awq", *SIGNED], "awq+gptq-signed": ["--method", "awq+gptq", *SIGNED],
           "gptq-signed-act": ["--method", "gptq", *SIGNED, "--act-order"]}


def row_key(model: str, setting: str, method: str) -> str:
    return f"{model}|{setting}|{method}"


def write_samples(model: str, args, path: Path) -> None:
    """The calibration windows lowbit itself samples, for the peers: int64 [N, L] in safetensors."""
    from safetensors.torch import save_file

    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.models.load import load
    from lowbit.quantize import calibration_samples

    ids = calibration_samples(load(model), read_text(args.calib),
                              CalibConfig(args.samples, args.seq_len, args.seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, str(path))


def quantize_lowbit(model: str, setting: str, method: str, args, out: Path) -> dict:
    bits, group = SETTINGS[setting]
    given = METHODS[method]
    pins = ([] if "--scale-rule" in given else ["--scale-rule", "absmax"]) + \
        ([] if "--act-order" in given else ["--no-act-order"])
    flags = [*given, *pins, "--bits", str(bits), "--group", str(group), "--sym"]
    if not method.startswith("rtn"):
        flags += ["--calib", str(args.calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                  "--seed", str(args.seed)]
    q = lowbit_quantize(model, flags, out, args.threads)
    return {"tool": "lowbit", "method": method, "bits_per_weight": q["bits_per_weight"],
            "quantize_seconds": q["wall_seconds"], "peak_rss_mib": q["peak_rss_mib"], "dir": str(out)}


def quantize_peer(model: str, setting: str, peer: str, args, samples: Path, out: Path) -> dict:
    """A peer's row: its de-quantized directory, or the reason it could not run."""
    from peers.common import failure_reason, run_peer

    bits, group = SETTINGS[setting]
    try:
        record = run_peer(peer, model, {"bits": bits, "group": group, "sym": True}, samples, out)
    except Exception as e:  # a peer failing is a result to report, not a crash of the benchmark
        return {"tool": peer, "method": peer, "error": failure_reason(e)}
    record.setdefault("tool", peer)
    record.setdefault("method", peer)
    record["dir"] = str(out)
    return record


def load_state(state_file: Path, json_file: Path) -> dict:
    """Rows by key: the work folder's record, then any evaluated lowbit row of the result JSON
    it lacks (peer rows come from their own result files, see peer_rows)."""
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if json_file.exists():
        for r in json.loads(json_file.read_text()).get("rows", []):
            if "result_file" not in r and ("ppl" in r or "error" in r):
                state.setdefault(row_key(r["model"], r["setting"], r["method"]), r)
    return state


def evaluate_rows(model: str, rows: list[dict], args, save) -> None:
    """ppl and KLD vs the float model for rows with a directory and no result yet (in place);
    `save()` after each batch, so an interrupted run keeps what it measured."""
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.models.load import load

    todo = [r for r in rows if "ppl" not in r and "error" not in r]
    if not todo:
        return
    fp = load(model)
    ids = tokenize(fp.tokenizer, read_text(args.text).text)
    for start in range(0, len(todo), args.batch):
        batch = todo[start:start + args.batch]
        models = {id(r): (fp.model if r["method"] == "fp" else load(r["dir"]).model) for r in batch}
        results = evaluate_many(models, ids, args.ctx, args.windows, reference=fp.model, reference_name=model)
        for r in batch:
            res = results[id(r)]
            r.update(ppl=res.ppl, kld=res.kld.mean, kld_p99=res.kld.p99, top1_changed=res.kld.top1_changed,
                     tokens=res.tokens, windows=res.windows, eval_seconds=res.seconds)
        del models
        save()


def peer_rows(models: list[str], settings: list[str], folder: Path, windows: tuple[int, int]) -> list[dict]:
    """Rows of the peer result files bench/peers/ wrote (evaluated by lowbit eval, same windows).
    A row calibrated on other than `windows` (samples, seq_len) says so in its method label."""
    by_grid = {grid: label for label, grid in SETTINGS.items() if label in settings}
    rows = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        grid = r.get("setting") if isinstance(r.get("setting"), dict) else r
        label = by_grid.get((grid.get("bits"), grid.get("group")))
        if r.get("model") not in models or label is None:
            continue
        used = r.get("calibration_windows")     # [samples, seq_len] the peer ran on; none when data-free
        method = r["peer"] if not used or tuple(used) == tuple(windows) else \
            f"{r['peer']} (calibration {used[0]} x {used[1]})"
        rows.append({"model": r["model"], "setting": label, "tool": f"{r.get('tool', r['peer'])} {r.get('tool_version', '')}".strip(),
                     "method": method, "bits_per_weight": r.get("bits_per_weight"),
                     "quantize_seconds": r.get("quantize_seconds"), "peak_rss_mib": r.get("peak_rss_mib"),
                     **{k: r[k] for k in ("ppl", "kld", "kld_p99", "top1_changed", "error", "note") if k in r},
                     "windows": r.get("eval_windows"), "result_file": str(f)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--peers", nargs="*", default=[], help="peer names known to bench/peers/common.py")
    p.add_argument("--calib", default=str(CALIB_TEXT))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=str(EVAL_TEXT))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--batch", type=int, default=6, help="models evaluated per pass of the reference")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of each quantize process")
    p.add_argument("--eval-only", action="store_true",
                   help="quantize nothing: evaluate and tabulate the rows already under --work")
    p.add_argument("--peer-results", default="bench/results/peers", help="folder of bench/peers/ result JSON")
    p.add_argument("--work", default=str(Path.home() / ".cache/lowbit/bench/weight_only"))
    p.add_argument("--json", default="bench/results/weight_only.json")
    args = p.parse_args()
    start = time.time()
    work = Path(args.work)
    state_file = work / "rows.json"
    state = load_state(state_file, Path(args.json))
    calib_id = f"{Path(args.calib).name}:{args.samples}x{args.seq_len}:seed{args.seed}"

    def save_state() -> None:
        work.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=1))

    for model in args.models:
        fp_key = row_key(model, "FP", "fp")
        state.setdefault(fp_key, {"tool": "-", "method": "fp", "bits_per_weight": 32.0})
        samples = work / model / f"calib-{args.samples}x{args.seq_len}-seed{args.seed}.safetensors"
        for setting in args.settings:
            for method in [*args.methods, *args.peers]:
                key = row_key(model, setting, method)
                if key in state and state[key].get("calibration", calib_id) == calib_id or args.eval_only:
                    continue
                out = work / model / setting.replace(" ", "_") / method
                if method in METHODS:
                    record = quantize_lowbit(model, setting, method, args, out)
                else:
                    if not samples.exists():
                        write_samples(model, args, samples)
                    record = quantize_peer(model, setting, method, args, samples, out)
                if not method.startswith("rtn"):
                    record["calibration"] = calib_id
                state[key] = {**record, "model": model, "setting": setting}
                save_state()
                print(f"[{model}] {setting} {method}: {record.get('error') or 'quantized'}", flush=True)
        rows = [r for k, r in state.items() if k.startswith(model + "|")]
        for r in rows:
            if r.get("windows") not in (None, args.windows) and "dir" in r:
                for k in ("ppl", "kld", "kld_p99", "top1_changed"):
                    r.pop(k, None)
        for r in rows:
            r.setdefault("model", model)
            r.setdefault("setting", "FP")
        evaluate_rows(model, rows, args, save_state)
        save_state()

    # the JSON keeps every measured row (all models and settings); the table shows this run's
    rows = [r for r in state.values() if "ppl" in r or "error" in r]
    rows += peer_rows(sorted({r["model"] for r in rows} | set(args.models)), list(SETTINGS), Path(args.peer_results),
                      (args.samples, args.seq_len))
    fp_ppl = {r["model"]: r["ppl"] for r in rows if r["method"] == "fp"}
    rtn_ppl = {(r["model"], r["setting"]): r["ppl"] for r in rows
               if r["tool"] == "lowbit" and r["method"] == "rtn" and r.get("ppl") is not None}
    for r in rows:
        if r.get("ppl") is not None:
            rise = r["ppl"] - fp_ppl[r["model"]]
            r["ppl_increase"] = rise
            rtn_rise = rtn_ppl.get((r["model"], r["setting"]), fp_ppl[r["model"]]) - fp_ppl[r["model"]]
            r["share_of_rtn_increase"] = rise / rtn_rise if rtn_rise > 0 else None
    order = {s: i for i, s in enumerate(["FP", *SETTINGS])}
    rows.sort(key=lambda r: (r["model"], order.get(r["setting"], 99), r.get("ppl") or float("inf")))
    headers = ["model", "setting", "tool", "method", "ppl", "Δppl / RTN's", "KLD", "bits/w", "quant s", "RSS MiB"]
    # rows measured on other windows stay in the JSON (each row says its windows) but not in this table
    shown = [r for r in rows if r["model"] in args.models and (r["method"] == "fp" or r["setting"] in args.settings)
             and r.get("windows") in (None, args.windows)]
    print(table(headers, [[r["model"], r["setting"], r["tool"], r["method"], r.get("ppl") or r.get("error", "-")[:60],
                           "-" if r.get("share_of_rtn_increase") is None else f"{r['share_of_rtn_increase']:.2f}",
                           r.get("kld"), r.get("bits_per_weight"), r.get("quantize_seconds"), r.get("peak_rss_mib")]
                          for r in shown]))
    print(f"eval: {args.text}, ctx {args.ctx}, first {args.windows} windows; calibration {calib_id} from "
          f"{args.calib}; KLD = mean KL(P_fp || P_q) in nats; Δppl / RTN's = ppl increase as a share of "
          f"RTN's at the same setting")
    write_json(Path(args.json), {"bench": "weight_only", "text": args.text, "ctx": args.ctx, "windows": args.windows,
                                 "calibration": calib_id, "machine": machine(), "seconds": time.time() - start,
                                 "rows": [{k: v for k, v in r.items() if k != "dir"} for r in rows]})


if __name__ == "__main__":
    main()
