"""Batch job logic (ds3dist.jobs) with an injected deterministic stand-in engine.

The stand-in's output for a prompt depends on the whole batch it arrives in, so a resumed job
only reproduces an uninterrupted one if it feeds the engine exactly the same batches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest

from ds3dist.jobs.batch import JobError, run_batch_job
from ds3dist.jobs.records import record_errors
from ds3dist.core.engine import EngineStats, ExpertLoad
from ds3dist.jobs.requests import DEFAULT_SAMPLING, LineError, PromptEncoder, detect_format
from ds3dist.core.request import RequestStatus


class FakeEngine:
    """stream() ends each request with tokens derived from a hash of (id, prompt, sampling):
    what a request gets never depends on what it shares a step with. stats() fixed.
    fail_after: raise (a simulated kill) after that many requests ended; fail_ids: requests
    that fail on their own; reject_ids: requests rejected at admission."""

    def __init__(self, tokenizer, fail_after: int | None = None, fail_ids=(), reject_ids=()):
        self.tok = tokenizer
        self.calls: list[dict] = []
        self.fail_after = fail_after
        self.fail_ids, self.reject_ids = set(fail_ids), set(reject_ids)
        self.shut = False
        self.scheduler = None

    def stream(self, requests):
        for req in requests:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            assert all(isinstance(t, int) for t in req.prompt_ids)
            p = req.params
            self.calls.append(dict(id=req.id, prompt=list(req.prompt_ids), max_new_tokens=req.max_new_tokens,
                                   temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                   seed=p.seed, stop=req.stop_text.strings if req.stop_text else None))
            if req.id in self.reject_ids or req.id in self.fail_ids:
                rejected = req.id in self.reject_ids
                req.status = RequestStatus.REJECTED if rejected else RequestStatus.FAILED
                req.error = "can never fit the cache pool" if rejected else "injected fault"
                yield req
                continue
            h = hashlib.sha256(json.dumps([req.id, req.prompt_ids, p.temperature, p.seed])
                               .encode()).digest()
            req.finish_reason = "length"
            for i in range(req.max_new_tokens):
                req.output_ids.append(1000 + h[i % len(h)] * 7 + i)
                if req.output_ids[-1] in req.stop_ids or (
                        req.stop_text is not None and req.stop_text.feed(req.output_ids[-1:])):
                    req.finish_reason = "stop"
                    break
            req.status = RequestStatus.FINISHED
            yield req

    def stats(self):
        return EngineStats(expert_load=ExpertLoad({1: [3, 0, 5, 2] * 4, 2: [1, 1, 1, 9] * 4}),
                           stage_seconds=[0.5, 0.25])

    def shutdown(self):
        self.shut = True


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def native_input(tmp_path: Path) -> Path:
    """20 lines: 18 valid (prompts, chats, two sampling groups), 2 malformed (lines 6, 13)."""
    lines: list = []
    for i in range(20):
        if i == 5:
            lines.append('{"id": "bad-json", "prompt": "unterminated')
        elif i == 12:
            lines.append({"id": "no-prompt"})
        elif i % 4 == 1:
            lines.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"Question {i}?"}]})
        elif i % 5 == 2:
            lines.append({"id": f"p{i}", "prompt": f"Prompt number {i}", "temperature": 0.8,
                          "seed": 3})
        else:
            lines.append({"id": i, "prompt": f"Prompt number {i} " * (1 + i % 3)})
    return write_lines(tmp_path / "in.jsonl", lines)


def run(engine, tok, inp, out, **kw):
    """run_batch_job; its summary as the summary file's JSON."""
    kw.setdefault("sampling", DEFAULT_SAMPLING.overridden(
        {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0,
         "stop": None}))
    kw.setdefault("progress", False)
    kw.setdefault("max_position_embeddings", 163840)
    return run_batch_job(engine, tok, inp, out, **kw).as_dict()


def test_native_job_outputs_errors_summary_plot(tmp_path, tok):
    inp = native_input(tmp_path)
    out = tmp_path / "out" / "results.jsonl"
    eng = FakeEngine(tok)
    s = run(eng, tok, inp, out)

    recs = read_jsonl(out)
    assert len(recs) == 18 and len({json.dumps(r["id"]) for r in recs}) == 18
    for r in recs:
        assert set(r) == {"id", "text", "token_ids", "finish_reason", "usage"}
        assert r["finish_reason"] in ("stop", "length")
        assert r["usage"]["completion_tokens"] == len(r["token_ids"]) == 8
        assert r["usage"]["prompt_tokens"] > 0
        assert r["text"] == tok.decode(r["token_ids"])
    errs = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert [e["line"] for e in errs] == [6, 13]
    assert errs[0]["code"] == "invalid_json_line" and "JSON" in errs[0]["reason"]
    assert errs[1]["id"] == "no-prompt" and "prompt" in errs[1]["reason"]

    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary == {k: v for k, v in s.items() if k != "summary"}
    c = summary["counts"]
    assert (c["lines"], c["valid"], c["errors"], c["generated"], c["already_done"],
            c["output_records"]) == (20, 18, 2, 18, 0, 18)
    assert summary["tokens"]["completion"] == 18 * 8
    assert summary["tokens"]["prompt"] == sum(r["usage"]["prompt_tokens"] for r in recs)
    assert summary["throughput"]["completion_tokens_per_second"] > 0
    assert summary["stage_seconds"] == [0.5, 0.25]
    assert summary["expert_load"]["1"] == [3, 0, 5, 2] * 4
    png = Path(summary["plot"])
    assert png == Path(str(out) + ".expert_load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_request_streams_with_its_own_sampling(tmp_path, tok):
    """No grouping by sampling parameters: one stream, in input order, each request with its
    own temperature and seed (line overrides, else the job's defaults)."""
    inp = native_input(tmp_path)
    eng = FakeEngine(tok)
    run(eng, tok, inp, tmp_path / "o.jsonl")
    ids = [json.loads(c["id"]) for c in eng.calls]
    want = [json.loads(x).get("id") for x in inp.read_text().splitlines()
            if x.startswith("{") and "bad-json" not in x and "no-prompt" not in x]
    assert ids == want and len(ids) == 18
    keys = {json.loads(c["id"]): (c["temperature"], c["seed"]) for c in eng.calls}
    assert keys["p2"] == keys["p7"] == (0.8, 3)
    assert all(v == (0.0, 0) for k, v in keys.items() if k not in ("p2", "p7"))


def test_engine_rejections_and_failures_go_to_the_errors_file(tmp_path, tok):
    inp = native_input(tmp_path)
    out = tmp_path / "o.jsonl"
    s = run(FakeEngine(tok, fail_ids={'"p2"'}, reject_ids={"4"}), tok, inp, out)
    assert {json.dumps(r["id"]) for r in read_jsonl(out)} >= {'"c1"', "0"}
    assert len(read_jsonl(out)) == 16 and s["counts"]["failed"] == 2
    errs = {e["id"]: e for e in read_jsonl(Path(str(out) + ".errors.jsonl"))}
    assert errs["p2"]["code"] == "engine_error" and errs["p2"]["reason"] == "injected fault"
    assert errs["p2"]["line"] == 3
    assert errs[4]["code"] == "context_length_exceeded" and "cache pool" in errs[4]["reason"]
    # a rerun (the fault gone) completes the two, duplicating nothing; the errors file keeps
    # the first run's records (the two engine errors, the two bad lines once)
    s2 = run(FakeEngine(tok), tok, inp, out)
    assert s2["counts"]["generated"] == 2 and len(read_jsonl(out)) == 18
    after = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert sorted(e["line"] for e in after) == [3, 5, 6, 13]
    assert {e["id"]: e for e in after}["p2"] == errs["p2"]


def test_chat_template_and_prompt_encoding(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "c", "messages": msgs},
                                               {"id": "p", "prompt": "Hello world"}])
    eng = FakeEngine(tok)
    run(eng, tok, inp, tmp_path / "o.jsonl")
    chat_ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True),
                          add_special_tokens=False)
    assert eng.calls[0]["prompt"] == chat_ids
    assert chat_ids[0] == tok.bos_token_id  # the template starts with the BOS text, once
    assert eng.calls[1]["prompt"] == PromptEncoder(tok, 1 << 30, "x").prompt("Hello world")


def test_resume_after_interruption_reproduces_uninterrupted_run(tmp_path, tok):
    inp = native_input(tmp_path)
    ref_out = tmp_path / "ref.jsonl"
    run(FakeEngine(tok), tok, inp, ref_out)
    ref = {json.dumps(r["id"]): r for r in read_jsonl(ref_out)}

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(FakeEngine(tok, fail_after=2), tok, inp, out)
    first = read_jsonl(out)
    assert 0 < len(first) < 18
    # the interrupted run still wrote its summary: what it did, and why it stopped
    failed = json.loads(Path(str(out) + ".summary.json").read_text())
    assert failed["error"] == "KeyboardInterrupt: simulated kill"
    assert failed["counts"]["generated"] == len(first) == 2
    # a kill while writing leaves a truncated last line
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])

    eng = FakeEngine(tok)
    s = run(eng, tok, inp, out)
    got = read_jsonl(out)
    ids = [json.dumps(r["id"]) for r in got]
    assert len(ids) == 18 and len(set(ids)) == 18
    assert {k: (r["text"], r["token_ids"]) for k, r in zip(ids, got)} == \
        {k: (r["text"], r["token_ids"]) for k, r in ref.items()}
    assert s["counts"]["already_done"] == len(first) - 1
    assert s["counts"]["generated"] == 18 - (len(first) - 1)
    # the errors file keeps each bad line's record once, however many runs met it
    assert len(read_jsonl(Path(str(out) + ".errors.jsonl"))) == 2

    # a third run has nothing left to do and calls the engine not at all
    eng3 = FakeEngine(tok)
    s3 = run(eng3, tok, inp, out)
    assert eng3.calls == [] and s3["counts"]["generated"] == 0
    assert len(read_jsonl(out)) == 18


def test_malformed_lines_each_get_a_reason(tmp_path, tok):
    inp = write_lines(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "ok"},
        {"id": 1, "prompt": "dup"},
        {"prompt": "no id"},
        {"id": 2, "prompt": "word " * 50},
        {"id": 3, "prompt": "x", "temperature": -1},
        {"id": 4, "prompt": "x", "top_p": 0},
        {"id": 5, "prompt": "x", "max_new_tokens": 0},
        {"id": 6, "prompt": "x", "stop": 5},
        {"id": 7, "prompt": 42},
        {"id": 8, "messages": [{"role": "wizard", "content": "hi"}]},
        {"id": 9, "messages": []},
        {"id": 10, "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {"id": [1], "prompt": "x"},
        "[1, 2]",
        "",
        {"id": 11, "prompt": "fine", "stop": "\n", "top_k": 5},
    ])
    eng = FakeEngine(tok)
    s = run(eng, tok, inp, tmp_path / "o.jsonl", max_prompt_tokens=20)
    errs = {e["line"]: e for e in read_jsonl(tmp_path / "o.jsonl.errors.jsonl")}
    assert sorted(errs) == list(range(2, 15))
    assert "already used on line 1" in errs[2]["reason"]
    assert "missing id" in errs[3]["reason"]
    assert errs[4]["code"] == "context_length_exceeded" and "job.max_prompt_tokens=20" in \
        errs[4]["reason"]
    assert errs[5]["reason"].startswith("temperature")
    assert errs[6]["reason"].startswith("top_p")
    assert errs[7]["reason"].startswith("max_new_tokens")
    assert errs[8]["reason"].startswith("stop")
    assert errs[9]["reason"].startswith("prompt")
    assert "role" in errs[10]["reason"]
    assert "messages" in errs[11]["reason"]
    assert "exactly one of prompt or messages" in errs[12]["reason"]
    assert errs[13]["reason"].startswith("id")
    assert "JSON object" in errs[14]["reason"]
    assert s["counts"]["lines"] == 15 and s["counts"]["valid"] == 2
    assert [c["stop"] for c in eng.calls] == [None, ["\n"]]
    assert eng.calls[1]["top_k"] == 5


def test_prompt_plus_new_tokens_beyond_positions_is_an_error(tmp_path, tok):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a b c d e f"},
                                               {"id": 2, "prompt": "a", "max_new_tokens": 2}])
    s = run(FakeEngine(tok), tok, inp, tmp_path / "o.jsonl", max_position_embeddings=8)
    errs = read_jsonl(tmp_path / "o.jsonl.errors.jsonl")
    assert [e["line"] for e in errs] == [1] and "max_position_embeddings=8" in errs[0]["reason"]
    assert s["counts"]["generated"] == 1


def openai_input(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "batch.jsonl", [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 5, "temperature": 0}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "deepseek-v3", "prompt": "Once upon a time", "max_tokens": 6,
                  "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\n\n"]}},
        {"custom_id": "req-3", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "deepseek-chat", "prompt": "chat needs messages"}},
        '{"custom_id": "req-4", "method": "POST", "url": ',
        {"custom_id": "req-5", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "system", "content": "Terse."},
                               {"role": "user", "content": [{"type": "text", "text": "Yo"}]}],
                  "max_completion_tokens": 4, "temperature": 0}},
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "again"}]}},
        {"custom_id": "req-6", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "req-7", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "x"}], "n": 2}},
        {"custom_id": "req-8", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": [0, 5, 7], "max_tokens": 3}},
        {"custom_id": "req-9", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": [0, 10**9], "max_tokens": 3}},
    ])


def test_openai_batch_format(tmp_path, tok):
    inp = openai_input(tmp_path)
    assert detect_format(inp.read_text().splitlines()) == "openai"
    out = tmp_path / "out.jsonl"
    eng = FakeEngine(tok)
    s = run(eng, tok, inp, out, model_name="tiny")
    assert s["format"] == "openai"
    recs = read_jsonl(out)
    by = {}
    for r in recs:
        assert set(r) == {"id", "custom_id", "response", "error"}
        key = r["custom_id"] if r["custom_id"] is not None else r["id"]
        assert key not in by
        by[key] = r
    # one line per custom_id; the bad-JSON line (no readable custom_id) is keyed by its line
    assert set(by) == {"req-1", "req-2", "req-3", "batch_req_line4", "req-5", "req-6", "req-7",
                       "req-8", "req-9"}

    chat = by["req-1"]
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "deepseek-chat"
    ch = body["choices"][0]
    assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
    assert ch["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5

    comp = by["req-2"]["response"]["body"]
    assert comp["object"] == "text_completion" and isinstance(comp["choices"][0]["text"], str)
    assert by["req-5"]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert by["req-5"]["response"]["body"]["model"] == "tiny"

    for k, code in [("req-3", "missing_required_parameter"), ("batch_req_line4",
                    "invalid_json_line"), ("req-6", "invalid_url"), ("req-7", "invalid_value"),
                    ("req-9", "invalid_value")]:
        assert by[k]["response"] is None, k
        assert by[k]["error"]["code"] == code, (k, by[k]["error"])
        assert by[k]["error"]["message"]
    assert "body.n" in by["req-7"]["error"]["message"]

    # sampling reached the engine: req-2's temperature/top_p/seed/stop, req-1's max_tokens
    c2 = [c for c in eng.calls if c["temperature"] == 0.7][0]
    assert (c2["top_p"], c2["seed"], c2["stop"], c2["max_new_tokens"]) == (0.9, 1, ["\n\n"], 6)
    errs = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["line"] for e in errs] == [3, 4, 6, 7, 8, 10]  # duplicate: errors file only
    assert [0, 5, 7] in [c["prompt"] for c in eng.calls]  # token-id prompt as is

    # rerun: nothing duplicated, nothing regenerated
    eng2 = FakeEngine(tok)
    run(eng2, tok, inp, out)
    assert eng2.calls == [] and read_jsonl(out) == recs


def test_output_locked_by_another_job(tmp_path, tok):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    out = tmp_path / "o.jsonl"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(JobError, match="another job"):
            run(FakeEngine(tok), tok, inp, out)
    finally:
        os.close(fd)


def test_explicit_paths_and_missing_input(tmp_path, tok):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    s = run(FakeEngine(tok), tok, inp, tmp_path / "o.jsonl", errors_path=tmp_path / "e.jsonl",
            summary_path=tmp_path / "s.json", plot_path=tmp_path / "p.png")
    assert (tmp_path / "e.jsonl").exists() and (tmp_path / "s.json").exists()
    assert s["plot"] == str(tmp_path / "p.png")
    with pytest.raises(JobError, match="job.input"):
        run(FakeEngine(tok), tok, tmp_path / "missing.jsonl", tmp_path / "o2.jsonl")


def test_launch_run_with_injected_engine(tmp_path, monkeypatch, tok, tiny_fp8_dir):
    """launch.run: default input (bundled sample), synthesis into the cache, engine shut down."""
    from hydra import compose, initialize_config_module

    from ds3dist import launch

    cache = tmp_path / "cache"
    monkeypatch.setenv("DS3DIST_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    engines = []

    def factory(checkpoint, resolved):
        assert resolved.layout.world_size == 4
        engines.append(FakeEngine(tok))
        return engines[-1]

    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        cfg = compose(config_name="config",
                      overrides=["+parallel=pp2ep2", "sampling.max_new_tokens=4",
                                 "job.progress=false"])
    s = launch.run(cfg, engine_factory=factory).as_dict()
    assert (cache / "tiny-seed0" / "config.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dir left
    sample = [json.loads(x) for x in launch.bundled_sample().read_text().splitlines() if x]
    out = Path(s["output"])
    assert out.parent.parent == Path("outputs") and out.name == "results.jsonl"
    assert len(read_jsonl(out)) == len(sample) and s["counts"]["errors"] == 0
    assert engines[0].shut
    assert s["meta"]["config"]["parallel"]["ep"] == 2
    # the synthesized cache copy has the weights of the fixture's seed-0 tiny checkpoint
    assert (cache / "tiny-seed0" / "config.json").read_text() == \
        (tiny_fp8_dir / "config.json").read_text()


def test_job_on_the_single_process_model(tmp_path, monkeypatch, tiny_fp8_dir, tok):
    """The whole launch path on the real tiny model: job outputs equal direct generate()."""
    import ds3dist
    import torch
    from hydra import compose, initialize_config_module

    from ds3dist import launch
    from ds3dist.local import LocalEngine

    monkeypatch.chdir(tmp_path)
    inp = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "The capital of France is"},
        {"id": "b", "messages": [{"role": "user", "content": "Hello!"}]},
        {"id": "c", "prompt": "def fibonacci(n):", "max_new_tokens": 3},
    ])
    made = []

    def factory(checkpoint, resolved):
        made.append(LocalEngine(ds3dist.load_model(checkpoint, dtype=torch.float32), tok))
        return made[-1]

    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"model.path={tiny_fp8_dir}", f"job.input={inp}", "job.output=o/out.jsonl",
            "sampling.temperature=0", "sampling.max_new_tokens=6",
            "job.progress=false"])
    s = launch.run(cfg, engine_factory=factory).as_dict()
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "o" / "out.jsonl")}
    assert set(recs) == {"a", "b", "c"}
    model = made[0].model
    for rid, prompt, n in [("a", "The capital of France is", 6),
                           ("b", tok.apply_chat_template([{"role": "user", "content": "Hello!"}]),
                            6),
                           ("c", "def fibonacci(n):", 3)]:
        want = ds3dist.generate(model, tok, [prompt], max_new_tokens=n, temperature=0.0)[0]
        assert recs[rid]["token_ids"] == want.token_ids
        assert recs[rid]["text"] == want.text
        assert recs[rid]["finish_reason"] == want.finish_reason
        assert recs[rid]["usage"]["prompt_tokens"] == want.prompt_tokens
    assert s["tokens"]["completion"] == sum(len(r["token_ids"]) for r in recs.values())


def test_errors_file_keeps_earlier_records_once(tmp_path):
    path = tmp_path / "e.jsonl"
    a = LineError(2, "x", "invalid_json", "bad")
    record_errors(path, [a])
    with open(path, "a") as f:  # an engine failure appended, then a line a kill cut short
        f.write(json.dumps({"line": 7, "id": "y", "code": "engine_error", "reason": "fault",
                            "raw": None}) + "\n" + '{"line": 9, "id"')
    record_errors(path, [a, LineError(4, "z", "invalid_json", "worse")])
    assert [(e["line"], e["code"]) for e in read_jsonl(path)] == \
        [(2, "invalid_json"), (7, "engine_error"), (4, "invalid_json")]
