"""Distilling generation on CPU: word-level KD on a corpus against sequence-level KD and on-policy rounds, offline.

Every arm continues the same initial student (per seed: a word-level KD student trained INIT_STEPS on the corpus
cache) for the same number of optimizer steps of the same batch size, with `train-student --init-from` (the
optimizer and one learning-rate schedule continue), then the final student writes continuations of held-out
prompts. Arms:
  ce           CE on the corpus (alpha 0)
  word_kd      forward KL on the corpus cache (today's default)
  seq_kd       CE on teacher continuations (`cache-teacher --generate`: the teacher writes, its targets are stored)
  seq_word_kd  forward KL on the teacher continuations' targets
  on_policy_R  R rounds of: the student generates (`logitcache generate`, vLLM on its checkpoint), the teacher scores
               exactly its tokens (`cache-teacher --response-ids`, top-k + tail), reverse KL (`--init-from`)
  mix          one round on half teacher continuations, half the initial student's (reverse KL)
Metrics: the teacher's NLL per token of the student's own continuations of held-out prompts (sampled at T=1; what
GKD/MiniLLM judge), distinct-2/3 over them (repetition collapse), their length, held-out corpus CE and KL (`logitcache
eval`); paired differences against word_kd over seeds with 95% t intervals. Also the cost of each round's stages, and
`generate` against plain vLLM generation of the same prompts.

    python benchmarks/bench_generation.py --work /tmp/bench_gen --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOGITCACHE = str(Path(sys.executable).with_name("logitcache"))
PROMPT_TOKENS = 32
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


LOGS: list[Path] = []  # the directory for each command's stderr (set in main)


def run(*args: str, capture: bool = False, attempts: int = 2) -> tuple[float, str]:
    """One `logitcache` command (its stderr kept in LOGS[0]); (seconds of the last attempt, stdout). A failed command is
    rerun once: every stage resumes, and on this shared machine a vLLM engine has died once under load."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = LOGS[0] / f"{len(list(LOGS[0].iterdir())):04d}-{args[0]}.log"
    for attempt in range(attempts):
        t0 = time.perf_counter()
        with log.open("a") as err:
            proc = subprocess.run(
                [LOGITCACHE, *args], check=False, text=True, stdout=subprocess.PIPE, stderr=err, env=env
            )
        if proc.returncode == 0:
            return time.perf_counter() - t0, proc.stdout if capture else ""
        print(f"attempt {attempt + 1}: logitcache {' '.join(args)} failed (log: {log})", flush=True)
    sys.exit(f"logitcache {' '.join(args)} failed {attempts} times; see {log}")


def prompt_files(demo: Path, work: Path, per_file: int) -> tuple[Path, Path]:
    """Training prompts (chunks of the teacher's corpus) and held-out prompts (chunks of files it never saw)."""
    out = []
    for source, name in (("train.jsonl", "train_prompts.jsonl"), ("heldout.jsonl", "heldout_prompts.jsonl")):
        texts = [json.loads(line)["text"] for line in (demo / "data" / source).read_text().splitlines()]
        rows = [t[i * 600 : i * 600 + 400] for t in texts for i in range(per_file) if len(t) > i * 600 + 400]
        path = work / name
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        out.append(path)
    return out[0], out[1]


def train(cache: Path, out: Path, steps: int, **flags: Any) -> float:
    if (out / "final").exists():  # a rerun of the benchmark: this run is done
        return float("nan")
    args = ["train-student", "--cache", str(cache), "--output", str(out), "--steps", str(steps), "--no-progress"]
    args += ["--batch-size", "8", "--eval-fraction", "0", "--save-every", "0", "--num-workers", "0"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)] if v is not True else [f"--{k.replace('_', '-')}"]
    return run(*args)[0]


def generate(model: Path, prompts: Path, out: Path, n: int, seed: int, max_prompts: int, new_tokens: int) -> float:
    return run(
        "generate", "--model", str(model), "--dataset", str(prompts), "--output", str(out), "--prompt-format", "text",
        "--prompt-tokens", str(PROMPT_TOKENS), "--n", str(n), "--seed", str(seed), "--max-prompts", str(max_prompts),
        "--max-new-tokens", str(new_tokens), "--dtype", "float32", "--gpu-memory-utilization", "0.15",
        "--max-model-len", "256", "--no-progress", "--engine-arg", "enforce_eager=true",
    )[0]  # fmt: skip


def score(teacher: Path, data: Path, out: Path, top_k: int) -> float:
    return run(
        "cache-teacher", "--teacher", str(teacher), "--dataset", str(data), "--output", str(out), "--backend", "hf",
        "--response-ids", "--targets", "topk", "--top-k", str(top_k), "--max-seq-len", "256", "--no-progress",
    )[0]  # fmt: skip


def on_policy(args: argparse.Namespace, init: Path, seed_dir: Path, seed: int, rounds: int) -> dict[str, Any]:
    """R rounds of generate -> score -> train (--init-from the previous round); the stage times of each round."""
    prev, stages = init, []
    for r in range(1, rounds + 1):
        d = seed_dir / f"on_policy_{rounds}" / f"round-{r}"
        gen_s = generate(prev / "final", args.train_prompts, d / "responses", 2, 1000 * seed + r, args.prompts, 48)
        score_s = score(args.teacher, d / "responses" / "data.jsonl", d / "cache", args.top_k)
        train_s = train(d / "cache", d / "student", args.steps // rounds, init_from=prev, loss="reverse_kl")
        stages.append({"generate_s": round(gen_s, 1), "score_s": round(score_s, 1), "train_s": round(train_s, 1)})
        prev = d / "student"
    return {"run": prev, "stages": stages}


def mix(args: argparse.Namespace, init: Path, seed_dir: Path, seed: int, teacher_rows: Path) -> Path:
    d = seed_dir / "mix"
    generate(init / "final", args.train_prompts, d / "responses", 1, 2000 + seed, args.prompts, 48)
    lines = (d / "responses" / "data.jsonl").read_text().splitlines()
    teacher = teacher_rows.read_text().splitlines()[: len(lines)]
    (d / "mixed.jsonl").write_text("".join(line + "\n" for line in lines + teacher))
    score(args.teacher, d / "mixed.jsonl", d / "cache", args.top_k)
    train(d / "cache", d / "student", args.steps, init_from=init, loss="reverse_kl")
    return d / "student"


def evaluate_generations(student: Path, teacher: Any, prompts: list[list[int]], seed: int) -> dict[str, float]:
    """The student samples continuations (T=1, 48 tokens, 2 per prompt, seeded); the teacher scores them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student / "final", dtype=torch.float32).eval()
    nll, tokens, lengths, grams = 0.0, 0, [], {2: [], 3: []}
    torch.manual_seed(seed)
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(
                x, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=48, num_return_sequences=2,
                eos_token_id=model.config.eos_token_id, pad_token_id=model.config.eos_token_id,
            )  # fmt: skip
            for seq in out:
                resp = seq[len(ids) :].tolist()
                if model.config.eos_token_id in resp:
                    resp = resp[: resp.index(model.config.eos_token_id) + 1]
                if not resp:
                    continue
                full = torch.tensor([ids + resp])
                logp = torch.log_softmax(teacher(full).logits[0, len(ids) - 1 : -1].float(), -1)
                nll -= logp.gather(1, torch.tensor(resp)[:, None]).sum().item()
                tokens += len(resp)
                lengths.append(len(resp))
                for n in (2, 3):
                    grams[n] += [tuple(resp[i : i + n]) for i in range(len(resp) - n + 1)]
    return {
        "teacher_nll": nll / tokens,
        "distinct_2": len(set(grams[2])) / max(len(grams[2]), 1),
        "distinct_3": len(set(grams[3])) / max(len(grams[3]), 1),
        "length": statistics.mean(lengths),
    }


def corpus_eval(args: argparse.Namespace, student: Path) -> dict[str, float]:
    """Held-out corpus CE and KL(teacher || student), what `logitcache eval --eval-fraction 1` prints (in-process:
    a subprocess per arm would cost more than the evaluation)."""
    from logitcache.storage import CacheReader
    from logitcache.train.config import EvalSettings, KDSettings
    from logitcache.train.evaluate import evaluate
    from logitcache.train.student import DistillModel, build_student

    cache = str(args.demo / "cache-heldout")
    built = build_student(str(student / "final"), CacheReader(cache))
    result = evaluate(DistillModel(built.model, built.vocab_size, KDSettings()), cache, EvalSettings(1.0))
    return {"heldout_ce": float(result["ce"]), "heldout_kl": float(result["kl"])}


def paired(rows: dict[str, dict[int, dict[str, float]]], base: str, metric: str) -> dict[str, str]:
    out = {}
    for arm, per_seed in rows.items():
        diffs = [per_seed[s][metric] - rows[base][s][metric] for s in per_seed]
        mean = statistics.mean(diffs)
        half = T_975.get(len(diffs) - 1, 2.0) * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0
        out[arm] = f"{mean:+.3f} ± {half:.3f}"
    return out


def throughput(args: argparse.Namespace, repeats: int = 2) -> dict[str, Any]:
    """`run_generate` (tokenizing, seeding each request, appending + fsyncing data.jsonl per batch) against plain
    `LLM.generate` of the same token prompts and sampling settings, on one engine, alternating (a ratio measured side
    by side on this noisy machine)."""
    import shutil

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from logitcache.pipeline.backends.vllm_backend import (
        EngineSettings,
        seeded_sampling_args,
        shutdown_llm,
        start_llm,
    )
    from logitcache.pipeline.config import GenerateConfig
    from logitcache.pipeline.generate import run_generate, sample_seed

    settings = EngineSettings(str(args.teacher), "float32", 256, 1, 1, 0.15)
    llm = start_llm(settings, max_logprobs=0, engine_args={"enforce_eager": True, **seeded_sampling_args()})
    out = args.work / "throughput"
    cfg = GenerateConfig(
        model=str(args.teacher), dataset=str(args.train_prompts), output=str(out), prompt_format="text",
        prompt_tokens=PROMPT_TOKENS, n=2, max_new_tokens=48, max_model_len=256, max_prompts=args.prompts,
        dtype="float32", progress=False,
    )  # fmt: skip
    tok = llm.get_tokenizer()
    texts = [json.loads(line)["text"] for line in args.train_prompts.read_text().splitlines()][: args.prompts]
    prompts = [TokensPrompt(prompt_token_ids=tok(t)["input_ids"][:PROMPT_TOKENS]) for t in texts]
    times: dict[str, list[float]] = {"plain": [], "generate": []}
    tokens = 0
    try:
        for _ in range(repeats):
            params = [
                SamplingParams(max_tokens=48, seed=sample_seed(0, i, j)) for i in range(len(prompts)) for j in range(2)
            ]
            t0 = time.perf_counter()
            outs = llm.generate([p for p in prompts for _ in range(2)], params, use_tqdm=False)
            times["plain"].append(time.perf_counter() - t0)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            run_generate(cfg, llm=llm)
            times["generate"].append(time.perf_counter() - t0)
    finally:
        shutdown_llm(llm)
    best = {k: min(v) for k, v in times.items()}
    return {
        "responses": 2 * len(prompts),
        "plain_tokens_per_s": round(tokens / best["plain"], 1),
        "generate_tokens_per_s": round(tokens / best["generate"], 1),
        "generate_over_plain_time": round(best["generate"] / best["plain"], 3),
        "seconds": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench_gen_out"))
    ap.add_argument("--demo", type=Path, default=Path("demo_out"), help="a `make demo` directory (built if missing)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--init-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=80, help="every arm's optimizer steps after the initial student")
    ap.add_argument("--prompts", type=int, default=160, help="training prompts per generation")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--arms", default="ce,word_kd,seq_kd,seq_word_kd,on_policy_2,on_policy_4,mix")
    ap.add_argument("--throughput-only", action="store_true", help="only `generate` against plain vLLM generation")
    ap.add_argument("--report-only", action="store_true", help="the table and figure from WORK/generation.json")
    args = ap.parse_args()
    if args.report_only:
        report(json.loads((args.work / "generation.json").read_text()), args.arms.split(","), args.work)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    LOGS.append(args.work / "logs")
    LOGS[0].mkdir(exist_ok=True)
    args.teacher = args.demo / "teacher"
    if not (args.demo / "cache" / "manifest.json").exists():
        sys.exit(f"{args.demo} has no finished demo cache: run `make demo` (or pass --demo)")
    args.train_prompts, heldout = prompt_files(args.demo, args.work, per_file=3)
    if args.throughput_only:
        result = throughput(args)
        (args.work / "throughput.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    results_file = args.work / "generation.json"
    doc: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {"seeds": {}}
    doc["args"] = {k: str(v) for k, v in vars(args).items()}
    teacher_cache = args.work / "teacher-continuations"
    if "teacher_generate_capture_s" not in doc:
        doc["teacher_generate_capture_s"] = round(run(
            "cache-teacher", "--teacher", str(args.teacher), "--dataset", str(args.train_prompts),
            "--output", str(teacher_cache), "--generate", "--generate-prompt-format", "text",
            "--generate-prompt-tokens", str(PROMPT_TOKENS), "--generate-n", "2", "--generate-max-new-tokens", "48",
            "--max-seq-len", "256", "--limit", str(args.prompts), "--targets", "topk", "--top-k", str(args.top_k),
            "--dtype", "float32", "--gpu-memory-utilization", "0.15", "--engine-arg", "enforce_eager=true",
            "--no-progress",
        )[0], 1)  # fmt: skip
    teacher_rows = Path(f"{teacher_cache}-responses") / "data.jsonl"
    _measure(args, doc, teacher_cache, teacher_rows, heldout, results_file)


def _measure(
    args: argparse.Namespace, doc: dict[str, Any], teacher_cache: Path, teacher_rows: Path, heldout: Path, out: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    texts = [json.loads(line)["text"] for line in heldout.read_text().splitlines()][: args.eval_prompts]
    eval_prompts = [tok(t)["input_ids"][:PROMPT_TOKENS] for t in texts]
    arms = args.arms.split(",")
    for seed in range(args.seeds):
        if str(seed) in doc["seeds"] and set(arms) <= set(doc["seeds"][str(seed)]):
            continue
        seed_dir = args.work / f"seed-{seed}"
        init = seed_dir / "init"
        if not (init / "final").exists():
            total = args.init_steps + args.steps
            train(args.demo / "cache", init, args.init_steps, student="tiny-llama", seed=seed, schedule_steps=total)
        runs: dict[str, Path] = {}
        extra: dict[str, Any] = {}
        for arm in arms:
            t0 = time.perf_counter()
            if arm in ("ce", "word_kd"):
                runs[arm] = seed_dir / arm
                train(args.demo / "cache", runs[arm], args.steps, init_from=init, alpha=0 if arm == "ce" else 1)
            elif arm in ("seq_kd", "seq_word_kd"):
                runs[arm] = seed_dir / arm
                train(teacher_cache, runs[arm], args.steps, init_from=init, alpha=0 if arm == "seq_kd" else 1)
            elif arm.startswith("on_policy_"):
                result = on_policy(args, init, seed_dir, seed, int(arm.rsplit("_", 1)[1]))
                runs[arm], extra[arm] = result["run"], {"stages": result["stages"]}
            elif arm == "mix":
                runs[arm] = mix(args, init, seed_dir, seed, teacher_rows)
            extra.setdefault(arm, {})["arm_seconds"] = round(time.perf_counter() - t0, 1)
        doc["seeds"][str(seed)] = {
            arm: {
                **evaluate_generations(path, teacher, eval_prompts, seed),
                **corpus_eval(args, path),
                **extra.get(arm, {}),
            }
            for arm, path in runs.items()
        }
        out.write_text(json.dumps(doc, indent=1))
        print(f"seed {seed} done", flush=True)
    report(doc, arms, args.work)


def report(doc: dict[str, Any], arms: list[str], work: Path) -> None:
    rows = {arm: {int(s): v[arm] for s, v in doc["seeds"].items()} for arm in arms}
    metrics = ("teacher_nll", "distinct_2", "distinct_3", "length", "heldout_ce", "heldout_kl")
    print("| arm | " + " | ".join(metrics) + " | Δ teacher-NLL vs word_kd | Δ distinct-2 | Δ held-out CE |")
    print("|---" * (len(metrics) + 4) + "|")
    d_nll, d_d2, d_ce = (paired(rows, "word_kd", m) for m in ("teacher_nll", "distinct_2", "heldout_ce"))
    for arm in arms:
        means = [statistics.mean(v[m] for v in rows[arm].values()) for m in metrics]
        print(f"| {arm} | " + " | ".join(f"{x:.3f}" for x in means) + f" | {d_nll[arm]} | {d_d2[arm]} | {d_ce[arm]} |")
    plot(rows, arms, work / "generation.png")


def plot(rows: dict[str, dict[int, dict[str, Any]]], arms: list[str], path: Path) -> None:
    """Teacher NLL of each arm's continuations against the wall-clock time the arm took (its generation and scoring
    included), one point per seed and the mean; seeds whose arm time was not measured (a resumed run) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        points = [(v["arm_seconds"], v["teacher_nll"]) for v in rows[arm].values() if v.get("arm_seconds", 0) > 5]
        if not points:
            continue
        xs, ys = zip(*points)
        dots = ax.scatter(xs, ys, alpha=0.4, s=18)
        ax.scatter([statistics.mean(xs)], [statistics.mean(ys)], color=dots.get_facecolor()[0], s=70, label=arm)
    ax.set_xlabel("arm wall-clock seconds (generate + score + train, 2-core CPU under load)")
    ax.set_ylabel("teacher NLL of the student's continuations (nats/token)")
    ax.set_title("Distilling generation: teacher-judged quality against training time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
