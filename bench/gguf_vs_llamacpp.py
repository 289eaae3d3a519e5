"""GGUF benchmark: lowbit's GGUF files against llama.cpp's own quantizer, judged by llama.cpp itself.

For one model: lowbit exports the float model as an F32 GGUF (the reference for every row);
then, per mix,
  llama.cpp            llama-quantize F32.gguf -> MIX (no importance matrix)
  llama.cpp+imatrix    the same with llama-imatrix's own imatrix of the calibration text
  lowbit rtn           lowbit export --type MIX (lowbit's scale search, llama.cpp's default weighting)
  lowbit imatrix       ... with lowbit's imatrix of the calibration text
  lowbit gptq          ... with GPTQ error compensation on each block's grid (Hessians of the same pass)
  lowbit awq           AWQ scales searched for the mix's types and folded in, then as lowbit imatrix
  lowbit awq+gptq      the same folded model, then as lowbit gptq
Every file is read by llama-perplexity on the same tokens of WikiText-2 raw test (its tokenizer,
its convention: windows of --ctx tokens, BOS first, the second half of each window scored) with
--kl-divergence against the F32 file's stored log-probs. Calibration: --calib-chunks windows of
--ctx tokens of wikitext-2 valid for both imatrices (llama-imatrix takes the first ones, lowbit a
seeded sample). Quantize time counts the calibration pass in every row that uses it: llama-imatrix's for the
llama.cpp+imatrix rows, lowbit's (imatrix and Hessians in one pass) for lowbit imatrix and gptq, and for
the awq rows the AWQ search plus a calibration pass of the folded model (searched once per mix).

    python bench/gguf_vs_llamacpp.py --model smollm2-135m            # every mix: ~35 min, plus ~10 min a mix for the awq rows
    python bench/gguf_vs_llamacpp.py --model gemma3-270m --mixes Q4_K_M Q8_0

Resumable: finished rows live in ~/.cache/lowbit/bench/gguf/<model>/rows.json (with the files);
--fresh starts over. Writes bench/results/gguf_<model>.json and prints the table.
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
          "lowbit awq+gptq")
ROWS_PLAIN = ("llama.cpp", "lowbit rtn")
PROMPT = "The capital of France is"


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


class LowbitSide:
    """The model loaded once and its calibration pass computed once, shared by every lowbit row."""

    def __init__(self, model: str):
        from lowbit.models.load import load

        self.model = model
        self.loaded = load(model)
        self._calibration, self.calib_seconds = None, 0.0
        self._awq = None  # (mix, folded model, its calibration, seconds) of the last mix asked for

    def awq(self, mix: str):
        """A second copy of the model with the mix's AWQ plan folded in, and its calibration pass."""
        if self._awq is None or self._awq[0] != mix:
            from lowbit.data.text import read_text
            from lowbit.export.gguf.awq import awq_gguf_plan
            from lowbit.export.gguf.imatrix import calibrate, calibration_windows
            from lowbit.methods.awq import apply_awq_plan
            from lowbit.models.load import load

            self._awq = None  # one folded copy at a time
            loaded = load(self.model)
            start = time.perf_counter()
            samples = calibration_windows(loaded, read_text(str(CALIB_TEXT)))
            apply_awq_plan(loaded.model, loaded.spec, awq_gguf_plan(loaded, mix, samples, progress=False))
            calibration = calibrate(loaded, samples, hessians=True)
            self._awq = (mix, loaded, calibration, time.perf_counter() - start)
        return self._awq[1:]

    def calibration(self):
        if self._calibration is None:
            from lowbit.data.text import read_text
            from lowbit.export.gguf.imatrix import calibrate_on_text

            start = time.perf_counter()
            self._calibration = calibrate_on_text(self.loaded, read_text(str(CALIB_TEXT)), hessians=True)
            self.calib_seconds = time.perf_counter() - start
        return self._calibration

    def export(self, mix: str, row: str, out: Path) -> float:
        """Write the row's file; returns seconds (including the shared calibration pass where used)."""
        from lowbit.export.gguf.writer import write_gguf

        loaded, kwargs, extra = self.loaded, {}, 0.0
        if row in ("lowbit imatrix", "lowbit gptq"):
            cal, extra = self.calibration(), self.calib_seconds
        elif row.startswith("lowbit awq"):
            loaded, cal, extra = self.awq(mix)
        if row != "lowbit rtn":
            kwargs = {"imatrix": cal.imatrix, "hessians": cal.hessians if row.endswith("gptq") else None}
        start = time.perf_counter()
        write_gguf(loaded, mix, out, **kwargs)
        return time.perf_counter() - start + extra


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
    lowbit = LowbitSide(args.model)

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
            key = f"{mix}/{row}"
            if key in state:
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
            facts = {"mix": mix, "row": row, "quantize_s": round(seconds, 1), **file_facts(out),
                     **llamacpp.kl_divergence(out, base, args.ctx, args.chunks)}
            facts["generates"] = generates(out)
            state[key] = facts
            save()
            print(f"{key}: KLD {facts['kld']:.5f} ppl {facts['ppl']:.3f} ({seconds:.0f} s)", flush=True)
            if not args.keep_files:
                out.unlink()
    return state


def summarize(state: dict, model: str, args) -> dict:
    order = {m: i for i, m in enumerate(K_MIXES + PLAIN_MIXES)}
    rows = [state["F32"]] + sorted((v for k, v in state.items() if "/" in k),
                                   key=lambda r: (order[r["mix"]], ROWS_K.index(r["row"])))
    for r in rows:  # ratios against llama.cpp's rows of the same mix, same run
        peers = {p["row"]: p["kld"] for p in rows if p["mix"] == r["mix"] and p["row"].startswith("llama.cpp")}
        r["kld_vs_llama"] = round(r["kld"] / peers["llama.cpp"], 3) if peers.get("llama.cpp") else None
        best = peers.get("llama.cpp+imatrix")
        r["kld_vs_llama_imatrix"] = round(r["kld"] / best, 3) if best else None
    header = ["mix", "row", "MiB", "bpw", "ppl", "KLD", "KLD p99", "same top %", "KLD/llama", "KLD/llama+im",
              "quantize s", "generates"]
    body = [[r["mix"], r["row"], r["file_mib"], r["bits_per_weight"], round(r["ppl"], 3), round(r["kld"], 5),
             r.get("kld_p99", ""), r.get("same_top_pct", ""), r["kld_vs_llama"] or "", r["kld_vs_llama_imatrix"] or "",
             round(r["quantize_s"], 1), r["generates"][:28]] for r in rows]
    print(table(header, body))
    return {"model": model, "eval_text": str(EVAL_TEXT), "calib_text": str(CALIB_TEXT), "ctx": args.ctx,
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
    p.add_argument("--calib-chunks", type=int, default=32, help="imatrix windows (lowbit: 32 x 512)")
    p.add_argument("--fresh", action="store_true", help="forget finished rows")
    p.add_argument("--keep-files", action="store_true", help="keep each quantized GGUF in the cache")
    args = p.parse_args()
    state = run(args)
    payload = summarize(state, args.model, args)
    write_json(REPO / "bench" / "results" / f"gguf_{args.model.replace('/', '_')}.json", payload)


if __name__ == "__main__":
    main()
