"""Greedy evaluation throughput: vLLM against transformers `generate`, same prompts, same model, float32.

    python benchmarks/vllm_throughput.py                      # sft-reversal of the small testbed family
    python benchmarks/vllm_throughput.py --size tiny          # seconds to build, overhead dominated
    python benchmarks/vllm_throughput.py --model runs/merge   # any local checkpoint

Prompts are the testbed suite (held-out hard prompts of every task, 12 new tokens at most). Measured:
- transformers `generate`, left-padded batches (the usual way to evaluate with transformers);
- the testbed's own KV-cached decoder (the transformers-based evaluator distmerge already has);
- vLLM in this process (`LLM.generate`, the engine `distmerge eval` runs in each actor), engine start
  reported apart from steady-state generation.
Each is timed after one warm-up batch; completions are compared so a speed-up never hides a wrong answer.
Every backend gets the same number of threads (--threads), set before torch is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench-vllm"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Local checkpoint folder; default: a testbed family model.")
    parser.add_argument("--size", choices=["tiny", "small"], default="small", help="Testbed family size.")
    parser.add_argument("--family-model", default="sft-reversal", help="Which family model to use.")
    parser.add_argument("--n-per-task", type=int, default=250, help="Prompts per testbed task.")
    parser.add_argument("--batch-size", type=int, default=250, help="Batch size of the transformers runs.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every backend.")
    parser.add_argument("--compile", action="store_true", help="Let vLLM compile (slower start, faster steps).")
    return parser.parse_args()


def checkpoint(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from distmerge.testbed import build_family

    family = build_family(CACHE / f"family-{args.size}-0", size=args.size, seed=0)
    return str(family.path(args.family_model))


def timed(run, prompts: list[str], batch_size: int) -> tuple[list[str], float]:
    """Completions of every prompt and the seconds it took, after one warm-up batch."""
    run(prompts[:batch_size])
    start = time.perf_counter()
    out = [text for i in range(0, len(prompts), batch_size) for text in run(prompts[i:i + batch_size])]
    return out, time.perf_counter() - start


def transformers_generate(folder: str, max_tokens: int):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.no_grad()
    def run(prompts: list[str]) -> list[str]:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return run


def testbed_decoder(folder: str, max_tokens: int):
    from distmerge.testbed.evaluate import generate_text
    from distmerge.testbed.training import load_model

    model = load_model(folder)
    return lambda prompts: generate_text(model, prompts, max_new_tokens=max_tokens)


def vllm_engine(folder: str, compile_graphs: bool) -> tuple[object, float]:
    import vllm

    start = time.perf_counter()
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=not compile_graphs, kv_cache_memory_bytes=1 << 30, seed=0)
    return llm, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    os.environ.update({"OMP_NUM_THREADS": str(args.threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "ERROR",
                       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"})
    os.environ.setdefault("VLLM_CACHE_ROOT", str(CACHE / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
    import torch

    from distmerge.evaluation.suites import testbed_suite

    torch.set_num_threads(args.threads)
    folder = checkpoint(args)
    suite = testbed_suite(None, args.n_per_task)
    prompts = [example.prompt for example in suite.examples]
    print(f"model {folder}; {len(prompts)} prompts ({len(suite.tasks)} tasks x {args.n_per_task}), at most "
          f"{suite.max_tokens} new tokens, float32, greedy, {args.threads} threads")
    results = {}
    for name, make in [("transformers generate", transformers_generate), ("testbed decoder", testbed_decoder)]:
        texts, seconds = timed(make(folder, suite.max_tokens), prompts, args.batch_size)
        results[name] = (texts, seconds)
        print(f"{name:<22} batch {args.batch_size}: {seconds:7.2f} s = {len(prompts) / seconds:8.1f} prompts/s")

    import vllm

    llm, start_seconds = vllm_engine(folder, args.compile)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=suite.max_tokens)
    texts, seconds = timed(lambda batch: [o.outputs[0].text for o in llm.generate(batch, params, use_tqdm=False)],
                           prompts, len(prompts))
    results["vLLM"] = (texts, seconds)
    mode = "compiled" if args.compile else "eager"
    print(f"{'vLLM (' + mode + ')':<22} all at once: {seconds:7.2f} s = {len(prompts) / seconds:8.1f} prompts/s "
          f"(engine start {start_seconds:.1f} s)")
    reference_texts, reference_seconds = results["transformers generate"]
    same = sum(a == b for a, b in zip(texts, reference_texts, strict=True))
    ratio = reference_seconds / seconds
    print(f"vLLM / transformers generate throughput: {ratio:.1f}x; identical completions {same}/{len(prompts)}")
    print(json.dumps({"model": folder, "prompts": len(prompts), "threads": args.threads, "vllm_mode": mode,
                      "prompts_per_second": {k: len(prompts) / s for k, (_, s) in results.items()},
                      "vllm_engine_start_seconds": start_seconds, "ratio_vllm_over_transformers": ratio,
                      "identical_completions": same}))


if __name__ == "__main__":
    main()
