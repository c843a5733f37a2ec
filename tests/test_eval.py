"""eval.py against its contract (SPEC §7): model_outputs.json has AlpacaEval's four fields, the reference's order
and its instructions verbatim (all 805 of the real file, when it is present); an interrupted run generates only the
missing rows and samples what an uninterrupted one would; bad input fails in one line. The judge path runs the real
alpaca_eval code against an OpenAI-compatible test server on 127.0.0.1 whose m/M log-probs are chosen so that the
win rate and its standard error are known in advance, and no connection goes anywhere else; it records the key it
is sent, which must never be OPENAI_API_KEY. Every loader is told not to run a checkpoint's own code. The vLLM
backend, when installed, writes the same format."""

import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import types
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import common
import eval as eval_py

REAL_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json"
FIELDS = ["dataset", "instruction", "output", "generator"]
JUDGE = "weighted_alpaca_eval_gpt4_turbo"
LOAD_GENERATOR = eval_py.load_generator  # the real one, before any test patches it


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = common.load_tokenizer("tiny")
    common.load_model("tiny", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(tiny_folder, tmp_path):
    """A fresh copy of the tiny checkpoint: each test gets its own alpaca_eval/ folder."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "ckpt"))


def fake_reference(path, n):
    """Rows shaped like AlpacaEval's reference (CC BY-NC, never copied here), one with edge whitespace."""
    rows = [
        dict(
            dataset="helpful_base" if i < n // 2 else "koala",
            instruction="  edge whitespace is kept \n" if i == 1 else f"instruction {i}",
            output=f"REFERENCE-ANSWER-{i}",
            generator="gpt4_1106_preview",
        )
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return rows


def eval_args(ckpt, reference, **changes):
    args = eval_py.EvalArgs(checkpoint=str(ckpt), reference=str(reference), judge="none", max_new_tokens=8)
    return replace(args, **changes)


def read_outputs(ckpt):
    return json.loads((ckpt / "alpaca_eval" / "model_outputs.json").read_text())


def test_cli_writes_rows_in_reference_order(ckpt, tmp_path):
    reference = fake_reference(tmp_path / "reference.json", 10)
    command = [sys.executable, "eval.py", str(ckpt), "--limit", "8", "--judge", "none", "--max_new_tokens", "8"]
    result = subprocess.run(
        [*command, "--reference", str(tmp_path / "reference.json")],
        cwd=common.REPO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = read_outputs(ckpt)
    assert [list(row) for row in rows] == [FIELDS] * 8
    assert [(r["instruction"], r["dataset"]) for r in rows] == [(r["instruction"], r["dataset"]) for r in reference[:8]]
    assert all(r["generator"] == "ckpt" and r["output"] == r["output"].strip() for r in rows)


@pytest.mark.skipif(not REAL_REFERENCE.exists(), reason="the AlpacaEval reference file is not in ../shared")
def test_all_805_instructions_verbatim(ckpt, monkeypatch):
    reference = json.loads(REAL_REFERENCE.read_text())
    monkeypatch.setattr(
        eval_py, "load_generator", lambda args, backend: lambda batch, first: [" answer \n"] * len(batch)
    )
    eval_py.run(eval_args(ckpt, REAL_REFERENCE, batch_size=128))
    rows = read_outputs(ckpt)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in reference]
    assert sum(r["instruction"] != r["instruction"].strip() for r in rows) == 5
    blocks = {name: [r["dataset"] for r in rows].count(name) for name in dict.fromkeys(r["dataset"] for r in rows)}
    assert blocks == {"helpful_base": 129, "koala": 156, "oasst": 188, "selfinstruct": 252, "vicuna": 80}
    assert {r["output"] for r in rows} == {"answer"}


class Interrupted(Exception):
    """Stands for Ctrl-C or a lost machine (pytest stops the session on a real KeyboardInterrupt)."""


def counting_generator(calls, stop_after=None):
    """Wraps the real tiny-model generator: records each batch of instructions, or stops after stop_after batches."""

    def load(args, backend):
        generate = LOAD_GENERATOR(args, backend)

        def counted(instructions, first):
            if len(calls) == stop_after:
                raise Interrupted
            calls.append(list(instructions))
            return generate(instructions, first)

        return counted

    return load


def test_interrupted_run_generates_only_missing_rows(ckpt, tmp_path, monkeypatch):
    reference = fake_reference(tmp_path / "reference.json", 8)
    args = eval_args(ckpt, tmp_path / "reference.json", limit=6, batch_size=2)
    first = []
    monkeypatch.setattr(eval_py, "load_generator", counting_generator(first, stop_after=2))
    with pytest.raises(Interrupted):
        eval_py.run(args)
    interrupted = read_outputs(ckpt)
    assert [r["instruction"] for r in interrupted] == [r["instruction"] for r in reference[:4]]

    second = []
    monkeypatch.setattr(eval_py, "load_generator", counting_generator(second))
    eval_py.run(args)
    rows = read_outputs(ckpt)
    assert second == [[reference[4]["instruction"], reference[5]["instruction"]]]
    assert rows[:4] == interrupted and [r["instruction"] for r in rows] == [r["instruction"] for r in reference[:6]]

    # once every row is there, the model is not even loaded
    monkeypatch.setattr(eval_py, "load_generator", lambda args, backend: pytest.fail("model loaded"))
    eval_py.run(replace(args, limit=3))
    assert read_outputs(ckpt) == rows

    # sampling is seeded per batch: the resumed file equals an uninterrupted run's
    monkeypatch.undo()
    other = Path(shutil.copytree(ckpt, tmp_path / "other", ignore=shutil.ignore_patterns("alpaca_eval")))
    eval_py.run(replace(args, checkpoint=str(other), generator="ckpt"))
    assert read_outputs(other) == rows


def test_checkpoint_code_never_runs(ckpt, tmp_path, monkeypatch):
    """Every loader is told trust_remote_code=False: a downloaded folder may ship Python files, never to be run."""
    import transformers

    calls = []

    def recording(name, load):
        def recorded(*args, **kwargs):
            calls.append((name, kwargs.get("trust_remote_code", "not given")))
            return load(*args, **kwargs)

        return recorded

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", recording(cls.__name__, cls.from_pretrained))
    vllm = types.ModuleType("vllm")  # a stand-in: the real one is not needed to see what LLM is given
    vllm.LLM, vllm.SamplingParams = recording("LLM", lambda **kwargs: None), None
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    args = eval_args(ckpt, tmp_path / "reference.json")
    eval_py.hf_generator(args)
    eval_py.vllm_generator(args)
    assert [name for name, _ in calls] == ["AutoTokenizer", "AutoModelForCausalLM", "AutoTokenizer", "LLM"]
    assert [trust for _, trust in calls] == [False] * 4


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_input_fails_in_one_line(ckpt, tmp_path, capsys):
    fake_reference(tmp_path / "reference.json", 4)
    ref = ["--reference", str(tmp_path / "reference.json"), "--max_new_tokens", "4"]
    (tmp_path / "no_output.json").write_text(json.dumps([{"dataset": "d", "instruction": "i", "generator": "g"}]))
    no_template = Path(shutil.copytree(ckpt, tmp_path / "no_template"))
    (no_template / "chat_template.jinja").unlink()
    (tmp_path / "stale").mkdir()
    shutil.copytree(ckpt, tmp_path / "stale" / "ckpt")
    (tmp_path / "stale" / "ckpt" / "alpaca_eval").mkdir()
    (tmp_path / "stale" / "ckpt" / "alpaca_eval" / "model_outputs.json").write_text('[{"instruction": "other"}]')
    cases = [
        ([str(tmp_path), *ref], "is not a model folder (no config.json)"),
        ([str(ckpt), "--reference", str(tmp_path / "no_output.json")], "row 0 has no string field output"),
        ([str(ckpt), "--reference", str(tmp_path / "missing.json")], "reference file not found"),
        ([str(ckpt), *ref, "--limit", "0"], "--limit must be at least 1"),
        ([str(no_template), *ref, "--judge", "none"], "has no chat template"),
        ([str(tmp_path / "stale" / "ckpt"), *ref], "row 0 is not an answer to reference row 0; delete the file"),
        ([str(ckpt), *ref, "--limit", "1", "--judge", "nobody"], "unknown judge 'nobody'"),
        (
            [str(ckpt), *ref, "--limit", "1", "--judge_base_url", f"http://127.0.0.1:{closed_port()}/v1"],
            "cannot reach the judge at http://127.0.0.1:",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            eval_py.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("eval: error: ") and message in err[-1], (argv, err)


def fails_in_one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        eval_py.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("eval: error: "), (argv, err)
    return err[0]


def test_outputs_file_of_another_shape_fails_in_one_line(ckpt, tmp_path, capsys):
    fake_reference(tmp_path / "reference.json", 2)
    argv = [str(ckpt), "--reference", str(tmp_path / "reference.json"), "--judge", "none", "--max_new_tokens", "4"]
    path = ckpt / "alpaca_eval" / "model_outputs.json"
    path.parent.mkdir()
    answer = '{"instruction": "instruction 0", "output": "an answer"}'
    cases = [
        ("null", "expected a JSON list of answers"),
        ("3", "expected a JSON list of answers"),
        ("{}", "expected a JSON list of answers"),
        (answer, "expected a JSON list of answers"),
        (f'[{answer}, "an answer"]', "row 1 is not an answer to reference row 1"),
        ("[null]", "row 0 is not an answer to reference row 0"),
    ]
    for text, message in cases:
        path.write_text(text)
        error = fails_in_one_line(argv, capsys)
        assert f"{path}: {message}; delete" in error and path.read_text() == text, (text, error)


def test_truncated_weights_fail_in_one_line_before_generating(ckpt, tmp_path, capsys):
    fake_reference(tmp_path / "reference.json", 2)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = [str(ckpt), "--reference", str(tmp_path / "reference.json"), "--judge", "none", "--max_new_tokens", "4"]
    assert f"{weights} is damaged or incomplete" in fails_in_one_line(argv, capsys)
    assert not (ckpt / "alpaca_eval" / "model_outputs.json").exists()


def test_unreadable_or_ambiguous_input_fails_in_one_line(ckpt, tmp_path, capsys):
    """A file in another encoding or a folder for a file, repeated reference instructions (the judge would pair each
    answer with both reference rows), and a model folder where alpaca_eval/ cannot be made."""
    reference = fake_reference(tmp_path / "reference.json", 2)
    latin1 = json.dumps([dict(reference[0], output="café")], ensure_ascii=False).encode("latin-1")
    (tmp_path / "latin1.json").write_bytes(latin1)
    (tmp_path / "repeated.json").write_text(json.dumps([*reference, dict(reference[0], output="other")]))
    unwritable = Path(shutil.copytree(ckpt, tmp_path / "unwritable"))
    (unwritable / "alpaca_eval").write_text("")  # stands for a read-only folder (tests run as root may write anyway)
    (ckpt / "alpaca_eval").mkdir()
    (ckpt / "alpaca_eval" / "model_outputs.json").write_bytes('[{"output": "café"}]'.encode("latin-1"))
    flags = ["--judge", "none", "--max_new_tokens", "4", "--reference"]
    cases = [
        ([str(ckpt), *flags, str(tmp_path / "latin1.json")], f"{tmp_path / 'latin1.json'}: not valid JSON"),
        ([str(ckpt), *flags, str(tmp_path)], f"cannot read the reference file {tmp_path}"),
        ([str(ckpt), *flags, str(tmp_path / "repeated.json")], "row 2 repeats the instruction of row 0"),
        ([str(ckpt), *flags, str(tmp_path / "reference.json")], "model_outputs.json is not readable JSON"),
        ([str(unwritable), *flags, str(tmp_path / "reference.json")], f"cannot create {unwritable / 'alpaca_eval'}"),
    ]
    for argv, message in cases:
        assert message in fails_in_one_line(argv, capsys), argv


def test_without_credentials_outputs_are_kept(ckpt, tmp_path, monkeypatch, capsys):
    for key in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(key, raising=False)
    fake_reference(tmp_path / "reference.json", 4)
    argv = [str(ckpt), "--reference", str(tmp_path / "reference.json"), "--limit", "2", "--max_new_tokens", "4"]
    eval_py.main(argv)  # returns: exit status 0
    out = capsys.readouterr().out
    assert "no judge credentials" in out and f"OPENAI_API_KEY=sk-... python eval.py {ckpt} --reference" in out
    assert len(read_outputs(ckpt)) == 2 and not (ckpt / "alpaca_eval" / "results.json").exists()


@pytest.fixture
def judge_server():
    """start(p_model) -> (url, requests): a chat-completions server on 127.0.0.1 that prefers the model's output
    with probability p_model[instruction], through the top_logprobs of "m" (first output) and "M" (second).
    requests holds (path, body, Authorization header) per request."""
    servers = []

    def start(p_model):
        requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append((self.path, body, self.headers["Authorization"]))
                prompt = "\n".join(message["content"] for message in body["messages"])
                instruction = next(i for i in p_model if f'"""{i}"""' in prompt)
                # alpaca_eval shuffles which output is shown first; the reference answers are easy to spot
                reference_first = prompt.index("REFERENCE-ANSWER") < prompt.index('"model_identifier": "M"')
                p_m = 1 - p_model[instruction] if reference_first else p_model[instruction]
                probs = {"m": p_m, "M": 1 - p_m}
                top = [dict(token=t, logprob=math.log(p), bytes=list(t.encode())) for t, p in probs.items()]
                best = max(top, key=lambda t: t["logprob"])
                choice = dict(
                    index=0,
                    finish_reason="length",
                    message=dict(role="assistant", content=best["token"]),
                    logprobs=dict(content=[dict(best, top_logprobs=top)]),
                )
                usage = dict(prompt_tokens=1, completion_tokens=1, total_tokens=2)
                reply = dict(id="t", object="chat.completion", created=0, model=body["model"], choices=[choice])
                data = json.dumps(dict(reply, usage=usage)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def local_only(monkeypatch):
    """No judge credentials from the environment, and any connection not to 127.0.0.1 fails the test."""
    for key in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(key, raising=False)
    connect = socket.socket.connect

    def guarded(sock, address):
        assert sock.family != socket.AF_INET or address[0] == "127.0.0.1", f"connection to {address}"
        assert sock.family != socket.AF_INET6, f"connection to {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_judge_against_local_server(ckpt, tmp_path, judge_server, local_only, capsys):
    reference = fake_reference(tmp_path / "reference.json", 4)
    p_model = [0.9, 0.2, 0.9, 0.2]  # WR = mean = 55, standard error = stdev / sqrt(4)
    url, requests = judge_server({row["instruction"]: p for row, p in zip(reference, p_model)})
    args = eval_args(ckpt, tmp_path / "reference.json", judge=JUDGE, judge_base_url=url, judge_model="test-judge")
    results = eval_py.run(args)
    assert results["win_rate"] == pytest.approx(55.0)
    assert results["standard_error"] == pytest.approx(statistics.stdev(100 * p for p in p_model) / 2)  # 20.21
    assert results["n_judged"] == 4 and results["length_controlled_winrate"] is None
    assert json.loads((ckpt / "alpaca_eval" / "results.json").read_text()) == results
    out = capsys.readouterr().out
    assert "WR 55.00 ± 20.21" in out and "LC left out: it is only defined on all 805" in out

    assert len(requests) == 4
    for path, body, _ in requests:
        assert path == "/v1/chat/completions"
        assert body["model"] == "test-judge" and body["logprobs"] is True and body["top_logprobs"] == 5

    # verdicts are cached in the run folder: judging again asks for nothing
    assert eval_py.run(args)["win_rate"] == pytest.approx(55.0) and len(requests) == 4


def test_judge_key_goes_only_to_its_server(ckpt, tmp_path, judge_server, local_only, monkeypatch):
    """OPENAI_API_KEY belongs to the OpenAI API: another judge server gets the key --judge_api_key_env names, or a
    dummy one, and no key is written to disk."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("MINPO_JUDGE_KEY", "judge-secret")
    reference = fake_reference(tmp_path / "reference.json", 2)
    url, requests = judge_server({row["instruction"]: 0.5 for row in reference})
    args = eval_args(ckpt, tmp_path / "reference.json", judge=JUDGE, judge_base_url=url, judge_model="a")
    eval_py.run(args)
    assert {auth for *_, auth in requests} == {"Bearer none"}

    # from the command line too, where alpaca_eval finds judge_client in __main__; judge b: not from a's cache
    command = [sys.executable, "eval.py", str(ckpt), "--reference", str(tmp_path / "reference.json"), "--judge_model"]
    command += ["b", "--judge_base_url", url, "--judge_api_key_env", "MINPO_JUDGE_KEY"]
    result = subprocess.run(command, cwd=common.REPO_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(requests) == 4 and {auth for *_, auth in requests[2:]} == {"Bearer judge-secret"}
    written = [path.read_text() for path in (ckpt / "alpaca_eval").rglob("*") if path.is_file()]
    assert any("MINPO_JUDGE_KEY" in text for text in written) and not any("secret" in text for text in written)


def test_remote_judge_over_plain_http_refused_before_any_work(ckpt, tmp_path, local_only, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setattr(eval_py, "load_generator", lambda args, backend: pytest.fail("model loaded"))
    fake_reference(tmp_path / "reference.json", 2)
    cases = [
        (["--judge_base_url", "http://example.com/v1"], "plain http would send the key and answers unencrypted"),
        (["--judge_base_url", "http://10.0.0.2:8000/v1"], "use https://"),
        (["--judge_base_url", "localhost:8000/v1"], "expected https://HOST[:PORT]/PATH"),
        (["--judge_api_key_env", "MINPO_JUDGE_KEY"], "--judge_api_key_env is the key of --judge_base_url"),
        (["--judge_base_url", "https://example.com/v1", "--judge_api_key_env", "MINPO_UNSET"], "MINPO_UNSET is not"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            eval_py.main([str(ckpt), "--reference", str(tmp_path / "reference.json"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], (flags, err)
    assert not (ckpt / "alpaca_eval").exists()
    for url in ("http://localhost:8000/v1", "http://127.0.0.2/v1", "http://[::1]:8000/v1", "https://example.com/v1"):
        eval_py.check_judge_url(url)


def test_lc_left_out_when_its_hub_file_is_unreachable(ckpt, tmp_path, judge_server, local_only, monkeypatch):
    """A full run (here: 4 instructions stand for 805) fetches the GLM's hub file; offline, WR is still reported."""
    monkeypatch.setattr(eval_py, "N_INSTRUCTIONS", 4)
    reference = fake_reference(tmp_path / "reference.json", 4)
    url, _ = judge_server({row["instruction"]: 0.75 for row in reference})
    args = eval_args(ckpt, tmp_path / "reference.json", judge=JUDGE, judge_base_url=url)
    results = eval_py.run(args)
    assert results["win_rate"] == pytest.approx(75.0)
    assert results["lc_note"].startswith("LC left out: could not download df_gamed.csv")


@pytest.mark.slow
def test_vllm_backend_writes_the_same_format(ckpt, tmp_path):
    pytest.importorskip("vllm")
    reference = fake_reference(tmp_path / "reference.json", 4)
    command = [sys.executable, "eval.py", str(ckpt), "--backend", "vllm", "--limit", "3", "--judge", "none"]
    command += ["--max_new_tokens", "8", "--reference", str(tmp_path / "reference.json")]
    result = subprocess.run(command, cwd=common.REPO_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_outputs(ckpt)
    assert [list(row) for row in rows] == [FIELDS] * 3
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in reference[:3]]
    assert all(r["generator"] == "ckpt" and r["output"] == r["output"].strip() for r in rows)
