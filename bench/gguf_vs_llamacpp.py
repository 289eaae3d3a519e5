"""GGUF benchmark: lowbit's GGUF files against llama.cpp's own quantizer, judged by llama.cpp itself.

For one model: lowbit exports the float model as an F32 GGUF (the reference for every row);
then, per mix,
  llama.cpp            llama-quantize F32.gguf -> MIX (no importance matrix)
  llama.cpp+imatrix    the same with llama-imatrix's own imatrix of the calibration text
  lowbit rtn           lowbit quantize --format gguf --type MIX --method rtn (llama.cpp's default weighting)
  lowbit imatrix       ... --method imatrix (each type's search weighted by its input's mean x²)
  lowbit gptq          ... --method gptq (GPTQ error compensation on each block's grid)
  lowbit awq           ... --method awq (AWQ scales judged on the mix's real types, folded in; then imatrix)
  lowbit awq+gptq      ... --method awq+gptq
  lowbit plan          `lowbit plan --like MIX` then GPTQ: the planner picks each decoder linear's type
                       (K-quant candidates, measured per-tensor KLD on probe rows of the calibration text)
                       within the bits the mix gives those linears; embedding and head as the mix has them,
                       so the file is no larger than the mix's (the row's time counts the planning)
  lowbit X (float inputs)   the same method with --inputs float: every layer calibrated on the float
                       model's activations (the old one-step export's convention) instead of the
                       already-quantized layers' outputs (the walker's, lowbit's default)
then `lowbit export DIR --format gguf`, which copies the blocks. Every file is read by llama-perplexity
on the same tokens of WikiText-2 raw test (its tokenizer, its convention: windows of --ctx tokens, BOS
first, the second half of each window scored) with --kl-divergence against the F32 file's stored
log-probs. Calibration: --calib-chunks windows of --ctx tokens of wikitext-2 valid (llama-imatrix takes
the first ones, lowbit a seeded sample). Quantize time counts the calibration in every row that uses it.

    python bench/gguf_vs_llamacpp.py --model smollm2-135m            # every mix and row: hours on 2 cores
    python bench/gguf_vs_llamacpp.py --model smollm2-135m --mixes Q4_K_M --rows "lowbit gptq" "lowbit gptq (float inputs)"

Resumable: finished rows live in ~/.cache/lowbit/bench/gguf/<model>/rows.json (with the files);
--fresh starts over. Rows of bench/results/gguf_<model>.json that this run did not redo are kept
(each says when and how it was measured). Writes that JSON and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent / "peers"))  # llamacpp_tools
from common import CALIB_TEXT, EVAL_TEXT, REPO, machine, table, write_json  # noqa: E402
import llamacpp_tools as llamacpp  # noqa: E402

K_MIXES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q2_K")
PLAIN_MIXES = ("Q8_0", "F16")
ROWS_K = ("llama.cpp", "llama.cpp+imatrix", "lowbit rtn", "lowbit imatrix", "lowbit gptq", "lowbit awq",
          "lowbit awq+gptq", "lowbit plan", "lowbit imatrix (float inputs)", "lowbit gptq (float inputs)",
          "lowbit awq+gptq (float inputs)")
ROWS_PLAIN = ("llama.cpp", "lowbit rtn")
PROMPT = "The capital of France is"
PROBE = (2, 256)   # the planner's probe rows (samples x tokens) of the calibration text, as bench/plan.py


def work_dir(model: str) -> Path:
    from lowbit.paths import cache_dir

    return cache_dir() / "bench" / "gguf" / model


def file_facts(path: Path) -> dict:
    """Size on disk and bits per weight over the tensor data of a GGUF file."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    nbytes, weights = sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)
    return {"file_mib": round(path.stat().st_size / 2**20, 2), "bits_per_weight": round(8 * nbytes / weights, 4)}


def generates(path: Path) -> str:
    """Eight greedy tokens from llama.cpp (llama-cpp-python) after PROMPT: the file loads and talks."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    text = llm(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    del llm
    return text.strip().replace("\n", " ")


def same_types_from_llama(f32: Path, planned: Path, lines: list[str], types: Path) -> str:
    """The plan's `--tensor-type-file` lines given to llama-quantize on the F32 export: "K/N" planned
    tensors whose type in llama.cpp's file equals the type in lowbit's planned file."""
    from gguf import GGUFReader

    types.write_text("\n".join(lines) + "\n")
    out = types.with_suffix(".gguf")
    llamacpp.quantize(f32, out, "Q8_0", tensor_types=types)
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    ours = {t.name: t.tensor_type.name for t in GGUFReader(planned).tensors}
    names = [line.split("=")[0].strip("^$").replace("\\", "") for line in lines]
    out.unlink()
    return f"{sum(theirs[n] == ours[n] for n in names)}/{len(names)}"


class LowbitSide:
    """Each lowbit row: the model loaded afresh, quantized by `lowbit quantize`'s path, exported."""

    def __init__(self, model: str, samples: int, seq_len: int, work: Path):
        self.model, self.samples, self.seq_len, self.work = model, samples, seq_len, work

    def planned(self, loaded, mix: str):
        """`lowbit plan --like MIX`'s plan (measured losses, computed once per model and cached); seconds."""
        from lowbit.analysis.probe import Probe
        from lowbit.data.calibration import CalibConfig
        from lowbit.data.text import read_text
        from lowbit.formats import format_from_name
        from lowbit.plans.gguf_mixes import K_TYPES, linear_budget_bpw, mix_plan, with_mix_edges
        from lowbit.analysis.tensor_losses import measured_losses
        from lowbit.models.gguf_names import family_for
        from lowbit.plans.planner import PlannerConfig, decoder_linears, llama_tensor_types, plan_bits
        from lowbit.quantize import calibration_samples

        names = decoder_linears(loaded.model, loaded.spec)
        shapes = {n: tuple(loaded.model.get_submodule(n).weight.shape) for n in names}
        path = self.work / "plan-losses.json"
        if not path.exists():
            start = time.perf_counter()
            rows = calibration_samples(loaded, read_text(str(CALIB_TEXT)), CalibConfig(PROBE[0], PROBE[1], 1))
            fmts = [format_from_name(t) for t in K_TYPES]
            losses = measured_losses(loaded.model, loaded.spec, Probe(loaded.model, loaded.spec, rows), names, fmts)
            path.write_text(json.dumps({"losses": losses, "seconds": time.perf_counter() - start,
                                        "probe": list(PROBE)}))
        found = json.loads(path.read_text())
        like = mix_plan(loaded.model.config, loaded.spec, mix)
        plan = plan_bits(names, shapes, found["losses"], PlannerConfig(linear_budget_bpw(like, shapes), K_TYPES))
        choices = {c.name: format_from_name(c.format) for c in plan.choices}
        self.tensor_types = llama_tensor_types(plan, family_for(loaded.model.config.model_type))
        return with_mix_edges(choices, like, mix), found["seconds"]

    def export(self, mix: str, row: str, out: Path) -> float:
        """Write the row's file; returns seconds (calibration, quantization and writing)."""
        from lowbit.data.calibration import CalibConfig
        from lowbit.data.text import read_text
        from lowbit.export.gguf.writer import write_gguf
        from lowbit.methods.awq import AwqConfig
        from lowbit.methods.gptq import GptqConfig
        from lowbit.methods.rtn import RtnConfig
        from lowbit.models.load import load
        from lowbit.plans.gguf_mixes import mix_plan
        from lowbit.quantize import QuantizeConfig, calibration_samples, quantize

        loaded = load(self.model)
        start = time.perf_counter()
        if mix in PLAIN_MIXES + ("F32",) and mix != "Q8_0":
            write_gguf(loaded, out, requantize=None if mix == "F32" else mix)
            return time.perf_counter() - start
        row = row.split(" [")[0]
        method = row.removeprefix("lowbit ").removesuffix(" (float inputs)")
        plan, planning = mix_plan(loaded.model.config, loaded.spec, mix), 0.0
        if method == "plan":
            (plan, planning), method = self.planned(loaded, mix), "gptq"
            start = time.perf_counter()       # the losses' seconds are `planning`, whether measured now or cached
        config = QuantizeConfig(plan=plan, method=method,
                                rtn=RtnConfig(clip="none"), gptq=GptqConfig(clip="none"),
                                awq=AwqConfig(duo=False, clip=False),  # as `lowbit quantize --format gguf`
                                calib=CalibConfig(samples=self.samples, seq_len=self.seq_len),
                                inputs="float" if row.endswith("(float inputs)") else "quantized")
        samples = calibration_samples(loaded, read_text(str(CALIB_TEXT)), config.calib) if config.calibrated else None
        quantize(loaded, config, samples, progress=False)
        write_gguf(loaded, out)
        return time.perf_counter() - start + planning


def run(args) -> dict:
    work = work_dir(args.model)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "rows.json"
    if args.fresh:
        for stale in work.iterdir():  # rows, logs, the imatrix and the base log-probs
            stale.unlink()
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    save = lambda: state_path.write_text(json.dumps(state, indent=1))  # noqa: E731
    llamacpp.ensure_tools()
    samples, seq_len = args.lowbit_calib or (args.calib_chunks, args.ctx)
    lowbit = LowbitSide(args.model, samples, seq_len, work)
    suffix = f" [{samples}x{seq_len}]" if args.lowbit_calib else ""  # lowbit rows on other calibration

    f32, base = work / "F32.gguf", work / f"base-c{args.ctx}-n{args.chunks}.kld"
    if "F32" not in state or not base.exists():
        start = time.perf_counter()
        lowbit.export("F32", "lowbit rtn", f32)
        seconds = time.perf_counter() - start
        ppl = llamacpp.save_base_logits(f32, EVAL_TEXT, base, args.ctx, args.chunks)
        state["F32"] = {"mix": "F32", "row": "lowbit (reference)", "ppl": ppl, "kld": 0.0, "quantize_s": seconds,
                        **file_facts(f32), "generates": generates(f32)}
        save()
    llama_imatrix = work / f"llama-c{args.ctx}-n{args.calib_chunks}.imatrix.gguf"
    for mix in args.mixes:
        rows = ROWS_K if mix in K_MIXES else ROWS_PLAIN
        for row in rows:
            if args.rows and row not in args.rows and not row.startswith("llama.cpp"):
                continue
            row = row + suffix if row.startswith("lowbit") else row
            key = f"{mix}/{row}"
            if key in state and measured_as(state[key], args):
                continue
            out = work / f"{mix}-{row.replace(' ', '_').replace('+', '_')}.gguf"
            if row.startswith("llama.cpp"):
                if row.endswith("imatrix") and ("llama_imatrix_s" not in state or not llama_imatrix.exists()):
                    start = time.perf_counter()
                    llamacpp.imatrix(f32, CALIB_TEXT, llama_imatrix, args.ctx, args.calib_chunks)
                    state["llama_imatrix_s"] = time.perf_counter() - start
                start = time.perf_counter()
                llamacpp.quantize(f32, out, mix, llama_imatrix if row.endswith("imatrix") else None)
                # like lowbit's calibrated rows, each imatrix row counts its calibration pass
                seconds = time.perf_counter() - start + (state["llama_imatrix_s"] if row.endswith("imatrix") else 0)
            else:
                seconds = lowbit.export(mix, row, out)
            facts = {"mix": mix, "row": row, "ctx": args.ctx, "chunks": args.chunks, "quantize_s": round(seconds, 1),
                     **file_facts(out),
                     **llamacpp.kl_divergence(out, base, args.ctx, args.chunks)}
            facts["generates"] = generates(out)
            if row.startswith("lowbit plan"):
                facts["llama_quantize_types"] = same_types_from_llama(f32, out, lowbit.tensor_types, work / "types.txt")
            facts["measured"] = time.strftime("%Y-%m-%d") + (" (lowbit quantize path)" if row.startswith("lowbit")
                                                             else "")
            state[key] = facts
            save()
            print(f"{key}: KLD {facts['kld']:.5f} ppl {facts['ppl']:.3f} ({seconds:.0f} s)", flush=True)
            if not args.keep_files:
                out.unlink()
    return state


def measured_as(row: dict, args) -> bool:
    """Whether a finished row was read on this run's windows (a row without them: the 40 × 512 default)."""
    return (row.get("ctx", 512), row.get("chunks", 40)) == (args.ctx, args.chunks)


def kept_rows(model: str, state: dict) -> dict:
    """Rows of the committed results JSON that this run has not redone, each saying how it was measured
    (and on which windows: the JSON's own ctx and chunks where the row does not say)."""
    path = REPO / "bench" / "results" / f"gguf_{model.replace('/', '_')}.json"
    if not path.exists():
        return {}
    kept, old = {}, json.loads(path.read_text())
    for r in old.get("rows", []):
        key = f"{r['mix']}/{r['row']}"
        if key not in state and r["mix"] != "F32":
            r.setdefault("measured", "before 2026-12-04 (one-step export: float-model calibration pass)")
            r.setdefault("ctx", old["ctx"])
            r.setdefault("chunks", old["chunks"])
            kept[key] = r
    return kept


def summarize(state: dict, model: str, args) -> dict:
    order = {m: i for i, m in enumerate(K_MIXES + PLAIN_MIXES)}
    state = {**kept_rows(model, state), **state}
    rows = [state["F32"]] + sorted((v for k, v in state.items() if "/" in k),
                                   key=lambda r: (order[r["mix"]], ROWS_K.index(r["row"].split(" [")[0]), r["row"]))
    for r in rows:  # ratios against llama.cpp's rows of the same mix read on the same windows
        peers = {p["row"]: p["kld"] for p in rows if p["mix"] == r["mix"] and p["row"].startswith("llama.cpp")
                 and measured_as(p, argparse.Namespace(ctx=r.get("ctx", 512), chunks=r.get("chunks", 40)))}
        r["kld_vs_llama"] = round(r["kld"] / peers["llama.cpp"], 3) if peers.get("llama.cpp") else None
        best = peers.get("llama.cpp+imatrix")
        r["kld_vs_llama_imatrix"] = round(r["kld"] / best, 3) if best else None
    header = ["mix", "row", "MiB", "bpw", "ppl", "KLD", "KLD p99", "same top %", "KLD/llama", "KLD/llama+im",
              "quantize s", "generates"]
    body = [[r["mix"], r["row"], r["file_mib"], r["bits_per_weight"], round(r["ppl"], 3), round(r["kld"], 5),
             r.get("kld_p99", ""), r.get("same_top_pct", ""), r["kld_vs_llama"] or "", r["kld_vs_llama_imatrix"] or "",
             round(r["quantize_s"], 1), r["generates"][:28]] for r in rows]
    print(table(header, body))
    path = REPO / "bench" / "results" / f"gguf_{model.replace('/', '_')}.json"
    kept = {k: v for k, v in json.loads(path.read_text()).items() if k in ("conditions", "notes")} \
        if path.exists() else {}
    return {**kept, "model": model, "eval_text": str(EVAL_TEXT), "calib_text": str(CALIB_TEXT), "ctx": args.ctx,
            "chunks": args.chunks, "tokens_scored": args.chunks * (args.ctx // 2), "calib_chunks": args.calib_chunks,
            "convention": "llama-perplexity: windows of ctx tokens with BOS, second half of each window scored; "
                          "KLD against the F32 export's stored log-probs, natural log, mean over scored tokens",
            "llama_cpp_python": llamacpp.VERSION, "machine": machine(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mixes", nargs="+", default=list(K_MIXES + PLAIN_MIXES), choices=K_MIXES + PLAIN_MIXES)
    p.add_argument("--ctx", type=int, default=512, help="llama-perplexity window (tokens)")
    p.add_argument("--chunks", type=int, default=40, help="evaluation windows")
    p.add_argument("--calib-chunks", type=int, default=32, help="calibration windows of --ctx tokens (both tools)")
    p.add_argument("--rows", nargs="+", default=None, choices=ROWS_K,
                   help="only these lowbit rows (llama.cpp's rows of each mix always run: the ratios need them)")
    p.add_argument("--lowbit-calib", nargs=2, type=int, default=None, metavar=("SAMPLES", "SEQ_LEN"),
                   help="calibrate lowbit's rows on SAMPLES windows of SEQ_LEN tokens instead of the shared "
                        "--calib-chunks x --ctx (the row names say so); e.g. 128 2048, `lowbit quantize`'s default")
    p.add_argument("--fresh", action="store_true", help="forget finished rows")
    p.add_argument("--keep-files", action="store_true", help="keep each quantized GGUF in the cache")
    args = p.parse_args()
    state = run(args)
    payload = summarize(state, args.model, args)
    write_json(REPO / "bench" / "results" / f"gguf_{args.model.replace('/', '_')}.json", payload)


if __name__ == "__main__":
    main()
