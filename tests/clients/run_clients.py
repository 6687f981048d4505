"""Real clients, unchanged, against `disagg up --mode disagg`: lm-evaluation-harness, guidellm
and the openai SDK. Run by `tests/clients/run.sh` (which builds their venv); not part of
`make test` (the installs are heavy).

- lm-eval `local-completions`: a multiple-choice (loglikelihood) task and a generate_until task
  with 6 stop strings on local JSON data this script writes; its scores and per-sample
  loglikelihoods must equal lm-eval's own `hf` model on the same checkpoint.
- guidellm `run` (synchronous, 20 requests, streamed, continuous usage): 0 errored requests.
- the openai SDK: `openai_features.py` in the clients' venv.

Prints one table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from disagg.cli.procs import Child, disagg_command, free_port
from disagg.cli.tiny import TinySpec, write_tiny_checkpoint

HERE = Path(__file__).resolve().parent
LOGLIK_TOLERANCE = 1e-3  # a sum over ~40 tokens of fp32 logprobs from two implementations
STOPS = ["\n\n", ".", "?", "!", ";", "Q:"]  # more than OpenAI's 4


def write_tasks(folder: Path) -> None:
    rng = random.Random(0)
    words = ["the", "river", "market", "opened", "seven", "light", "stone", "water", "north"]
    phrase = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    mc = [{"question": phrase(6), "choices": [phrase(2) for _ in range(4)],
           "answer": rng.randrange(4)} for _ in range(10)]  # fmt: skip
    gen = [{"question": f"Q: {phrase(5)}\nA:", "answer": rng.choice(words)} for _ in range(8)]
    (folder / "mc.json").write_text(json.dumps(mc))
    (folder / "gen.json").write_text(json.dumps(gen))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "disagg_mc.yaml").write_text(
        f"task: disagg_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/mc.json\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n'
    )
    (folder / "disagg_gen.yaml").write_text(
        f"task: disagg_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/gen.json\n"
        'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
        f"  until: {json.dumps(STOPS)}\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def lm_eval(venv: Path, model_args: str, model: str, tasks: Path, out: Path) -> float:
    argv = [str(venv / "bin" / "lm_eval"), "--model", model, "--model_args", model_args,
            "--tasks", "disagg_mc,disagg_gen", "--include_path", str(tasks), "--log_samples",
            "--output_path", str(out), "--batch_size", "1"]  # fmt: skip
    argv += ["--device", "cpu"] if model == "hf" else []
    started = time.monotonic()
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
    return time.monotonic() - started


def samples(out: Path, task: str) -> list[dict]:
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def results(out: Path) -> dict:
    (path,) = glob.glob(str(out / "*" / "results_*.json"))
    return json.loads(Path(path).read_text())["results"]


def compare_lm_eval(ours: Path, ref: Path) -> list[tuple[str, bool, str]]:
    rows = []
    mine, theirs = results(ours), results(ref)
    for task, metric in (("disagg_mc", "acc,none"), ("disagg_gen", "exact_match,none")):
        a, b = mine[task][metric], theirs[task][metric]
        rows.append((f"lm-eval {task} {metric.split(',')[0]}", a == b, f"disagg {a} / hf {b}"))
    worst = 0.0
    same_greedy = True
    for x, y in zip(samples(ours, "disagg_mc"), samples(ref, "disagg_mc"), strict=True):
        for (ll_x, greedy_x), (ll_y, greedy_y) in zip(x["filtered_resps"], y["filtered_resps"]):
            worst = max(worst, abs(float(ll_x) - float(ll_y)))
            same_greedy &= greedy_x == greedy_y
    detail = f"max |diff| {worst:.2e} over every choice; is_greedy equal: {same_greedy}"
    rows.append(("lm-eval loglikelihoods vs hf", worst <= LOGLIK_TOLERANCE and same_greedy, detail))
    gens = [(x["filtered_resps"], y["filtered_resps"])
            for x, y in zip(samples(ours, "disagg_gen"), samples(ref, "disagg_gen"))]  # fmt: skip
    rows.append(("lm-eval generate_until (6 stops) vs hf", all(a == b for a, b in gens),
                 f"{sum(a == b for a, b in gens)}/{len(gens)} generations identical"))  # fmt: skip
    return rows


def guidellm(venv: Path, base: str, model: Path, out: Path) -> tuple[str, bool, str]:
    report = out / "guidellm.json"
    argv = [str(venv / "bin" / "guidellm"), "run",
            "--backend", f"kind=openai_http,target={base}",
            "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=20",
            "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
            "--tokenizer", f"kind=huggingface_auto,model={model}",
            "--output", f"kind=json,path={report}", "--disable-console-interactive"]  # fmt: skip
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=900, cwd=out)
    state = json.loads(report.read_text())["benchmarks"][0]["scheduler_state"]
    ok, bad = state["successful_requests"], state["errored_requests"]
    return (
        "guidellm run (synchronous, 20 requests)",
        bad == 0 and ok == 20,
        f"{ok} ok, {bad} errored",
    )


def openai_sdk(venv: Path, base: str, model_name: str) -> list[tuple[str, bool, str]]:
    argv = [str(venv / "bin" / "python"), str(HERE / "openai_features.py"), base, model_name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    rows = [tuple(json.loads(line)) for line in done.stdout.splitlines() if line.startswith("[")]
    if done.returncode and not rows:
        rows = [("openai SDK", False, done.stderr.strip().splitlines()[-1][:120])]
    return rows


def wait_ready(base: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"disagg up not healthy within {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, required=True, help="the clients' venv")
    p.add_argument("--keep", type=Path, default=None, help="keep outputs in this folder")
    args = p.parse_args()
    args.venv = args.venv.resolve()
    work = args.keep or Path(tempfile.mkdtemp(prefix="disagg-clients-"))
    work.mkdir(parents=True, exist_ok=True)
    model = write_tiny_checkpoint(work / "tiny", TinySpec(vocab_size=384))
    (work / "tasks").mkdir(exist_ok=True)
    write_tasks(work / "tasks")
    port, nats_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with open(work / "up.log", "w") as log:
        # float32: lm-eval's hf model, the reference, runs the checkpoint in float32 too.
        up = Child("up", [*disagg_command(), "up", "--mode", "disagg", "--model", str(model),
                          "--port", str(port), "--nats-port", str(nats_port),
                          "--dtype", "float32"], log=log)  # fmt: skip
        try:
            wait_ready(base)
            rows: list[tuple[str, bool, str]] = []
            ours = f"model={model.name},base_url={base}/v1/completions,tokenizer={model},"
            ours += "tokenized_requests=True,num_concurrent=1,max_retries=1"
            took = lm_eval(args.venv, ours, "local-completions", work / "tasks", work / "lm-disagg")
            lm_eval(args.venv, f"pretrained={model},dtype=float32", "hf", work / "tasks",
                    work / "lm-hf")  # fmt: skip
            rows += compare_lm_eval(work / "lm-disagg", work / "lm-hf")
            rows[-1] = (*rows[-1][:2], rows[-1][2] + f" (disagg run {took:.0f} s)")
            rows.append(guidellm(args.venv, base, model, work))
            rows += openai_sdk(args.venv, base, model.name)
        finally:
            up.stop()
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  result  detail")
    for name, ok, detail in rows:
        print(f"{name:<{width}}  {'pass' if ok else 'FAIL':<6}  {detail}")
    print(f"outputs in {work}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
