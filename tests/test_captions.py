"""Captions: PathLDM's report captions, label captions, and the LLM summariser against a local fake server."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from histosynth.conditions.captions import (
    LABEL_LEVELS,
    PATHLDM_CLASSES,
    build_captions,
    label_caption,
    label_captions_from_store,
    load_summaries,
    nuclei_counts,
    pathldm_caption,
    tumor_til_class,
)
from histosynth.conditions.report_summaries import KEY_POINTS_PROMPT, LLMError, read_summary_cache, summarize_reports
from histosynth.cli.captions import captions
from histosynth.errors import HistosynthError

# ------------------------------------------------------------------------------------ PathLDM captions


def test_pathldm_caption_levels_and_threshold():
    assert pathldm_caption(0.7, 0.2, "Invasive ductal carcinoma.") == "high tumor; low til; Invasive ductal carcinoma."
    assert pathldm_caption(0.5, 0.4999, "s") == "high tumor; low til; s"  # >= threshold is high
    assert pathldm_caption(0.0, 1.0, "s") == "low tumor; high til; s"
    assert pathldm_caption(0.7, 0.9, "s", threshold=0.8) == "low tumor; high til; s"
    assert pathldm_caption(None, 0.9, "  two\n lines ") == "high til; two lines"  # missing part left out
    assert pathldm_caption(0.9, "", None) == "high tumor"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pathldm_caption(1.2, 0.1, "s")
    # the 4-class baseline uses the same levels
    assert [tumor_til_class(t, l) for t, l in [(0.1, 0.1), (0.1, 0.9), (0.9, 0.1), (0.9, 0.9)]] == [0, 1, 2, 3]
    for k, (t, l) in enumerate([(0.1, 0.1), (0.1, 0.9), (0.9, 0.1), (0.9, 0.9)]):
        assert PATHLDM_CLASSES[k] == pathldm_caption(t, l, None)


def _table(n=200):
    return [{"patch": f"p{i}", "slide": f"s{i % 2}", "tumor_prob": (i % 10) / 10, "til_prob": 0.6} for i in range(n)]


SUMMARIES = {"s0": ["A0", "A1", "A2", "A3", "A4"], "s1": "B only"}


def test_build_captions_seeded_summary_choice():
    rows = build_captions(_table(), SUMMARIES, seed=7)
    assert len(rows) == 200
    assert rows[0]["caption"].startswith("low tumor; high til; A")
    assert rows[9]["caption"] == "high tumor; high til; B only" and rows[9]["summary_index"] == 0
    assert rows[5]["caption"].startswith("high tumor; ")  # 0.5 is high
    # same seed, same draws; independent of table order
    again = {r["patch"]: r["caption"] for r in build_captions(list(reversed(_table())), SUMMARIES, seed=7)}
    assert all(again[r["patch"]] == r["caption"] for r in rows)
    # another seed draws differently; every summary of the slide gets used
    other = build_captions(_table(), SUMMARIES, seed=8)
    assert [r["summary_index"] for r in other] != [r["summary_index"] for r in rows]
    used = Counter(r["summary_index"] for r in rows if r["slide"] == "s0")
    assert set(used) == {0, 1, 2, 3, 4} and min(used.values()) >= 8
    assert all(r["caption"].endswith(SUMMARIES["s0"][r["summary_index"]]) for r in rows if r["slide"] == "s0")


def test_build_captions_missing_summaries_and_bad_rows():
    table = _table(4) + [{"patch": "q", "slide": "unknown", "tumor_prob": 0.9, "til_prob": 0.1}]
    with pytest.raises(HistosynthError, match="patch 'q': no summary for slide 'unknown'"):
        build_captions(table, SUMMARIES, seed=0)
    assert build_captions(table, SUMMARIES, seed=0, on_missing="levels-only")[-1]["caption"] == "high tumor; low til"
    assert len(build_captions(table, SUMMARIES, seed=0, on_missing="skip")) == 4
    with pytest.raises(HistosynthError, match="duplicate patch id 'p0'"):
        build_captions(_table(2) + _table(1), SUMMARIES, seed=0)
    with pytest.raises(HistosynthError, match="patch 'x'.*\\[0, 1\\]"):
        build_captions([{"patch": "x", "slide": "s1", "tumor_prob": "1.5", "til_prob": 0}], SUMMARIES, seed=0)


# ------------------------------------------------------------------------------------ label captions

CONSEP = ("other", "inflammatory", "epithelial", "spindle-shaped")


def _hand_built_maps():
    """12 epithelial, 3 inflammatory, 1 other nucleus and no spindle-shaped one, as 3x3 squares on a grid."""
    inst = np.zeros((64, 64), np.int32)
    types = np.zeros((64, 64), np.int32)
    kinds = [3] * 12 + [2] * 3 + [1]
    for k, t in enumerate(kinds, 1):
        y, x = divmod(k - 1, 8)
        inst[4 + 6 * y:7 + 6 * y, 2 + 6 * x:5 + 6 * x] = k
        types[4 + 6 * y:7 + 6 * y, 2 + 6 * x:5 + 6 * x] = t
    # nucleus 1 (epithelial) has 2 of its 9 pixels typed inflammatory: typed by its majority
    types[4, 2:4] = 2
    return inst, types


def test_label_caption_on_hand_built_map():
    inst, types = _hand_built_maps()
    counts = nuclei_counts(inst, types, CONSEP)
    assert counts == {"other": 1, "inflammatory": 3, "epithelial": 12, "spindle-shaped": 0}
    expected = "few other nuclei; few inflammatory nuclei; many epithelial nuclei; no spindle-shaped nuclei"
    assert label_caption((inst, types), CONSEP) == expected
    assert label_caption(counts, CONSEP) == expected
    assert label_caption([1, 3, 12, 0], CONSEP) == expected
    assert label_caption(counts, CONSEP, exclude=("other",)) == (
        "few inflammatory nuclei; many epithelial nuclei; no spindle-shaped nuclei")
    assert label_caption(counts, CONSEP, levels=((0, "no"), (1, "some"), (3, "several"), (12, "lots of"))) == (
        "some other nuclei; several inflammatory nuclei; lots of epithelial nuclei; no spindle-shaped nuclei")
    # the documented thresholds: 0 no, 1..9 few, >= 10 many
    assert LABEL_LEVELS == ((0, "no"), (1, "few"), (10, "many"))
    assert label_caption([0, 9, 10, 1], CONSEP) == (
        "no other nuclei; few inflammatory nuclei; many epithelial nuclei; few spindle-shaped nuclei")
    with pytest.raises(ValueError, match="unknown types"):
        label_caption({"stroma": 2}, CONSEP)
    with pytest.raises(ValueError, match="levels must start at 0"):
        label_caption(counts, CONSEP, levels=((1, "few"),))


def test_label_captions_from_store_and_cli(hgsc_store, tmp_path):
    from histosynth.data.store import PatchStore

    store = PatchStore(hgsc_store)
    rows = label_captions_from_store(hgsc_store, split="train")
    assert len(rows) == len(store.indices("train")) > 0
    for row in rows[:20]:
        patch = store[row["index"]]
        assert row["caption"] == label_caption((patch["inst_map"], patch["type_map"]), store.class_names)
    out = tmp_path / "labels.jsonl"
    res = CliRunner().invoke(captions, ["build", "--from-labels", str(hgsc_store), "--out", str(out),
                                        "--exclude", store.class_names[0]])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(store) and all(store.class_names[0] not in r["caption"] for r in lines)
    res = CliRunner().invoke(captions, ["build", "--from-labels", str(hgsc_store), "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output


def test_cli_build_from_csv_and_summaries(tmp_path):
    table = tmp_path / "probs.csv"
    table.write_text("patch,slide,tumor_prob,til_prob\np1,TCGA-A,0.91,0.12\np2,TCGA-B,0.05,\n", encoding="utf-8")
    summaries = tmp_path / "summaries.json"
    summaries.write_text(json.dumps({"TCGA-A": ["IDC, grade 2.", "Ductal carcinoma."], "TCGA-B": "Benign."}))
    out = tmp_path / "captions.jsonl"
    res = CliRunner().invoke(captions, ["build", str(table), "--summaries", str(summaries), "--out", str(out),
                                        "--seed", "3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["caption"] in ("high tumor; low til; IDC, grade 2.", "high tumor; low til; Ductal carcinoma.")
    assert rows[1]["caption"] == "low tumor; Benign." and rows[1]["til_prob"] is None
    res = CliRunner().invoke(captions, ["build", str(table), "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "--summaries" in res.output


# ------------------------------------------------------------------------------------ the summariser

class FakeLLM:
    """An OpenAI-compatible chat server on 127.0.0.1 (port 0) answering at most ``max_requests`` requests.

    ``script`` lists what the next requests get: ``"ok"``, an HTTP status (int), or ``("sleep", s)``
    (answer after s seconds, to provoke a client timeout); once exhausted every request gets ``"ok"``.
    """

    def __init__(self, script=(), max_requests=40):
        self.script = list(script)
        self.max_requests = max_requests
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    action = fake.script.pop(0) if fake.script else "ok"
                try:
                    if isinstance(action, int):
                        self._send(action, {"error": {"message": f"scripted {action}"}}, retry_after=action == 429)
                        return
                    if isinstance(action, tuple):
                        time.sleep(action[1])
                    self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                          "content": fake.answer(body)}}]})
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status, payload, retry_after=False):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.timeout = 0.05
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def answer(body):
        messages = body["messages"]
        report = messages[1]["content"].split('"""')[1].strip()
        if len(messages) == 2:
            return f"- key point: {report}"
        return f"Summary ({body['max_tokens']} tokens max): {report}"

    def _serve(self):
        while not self.stop.is_set() and len(self.requests) < self.max_requests:
            self.server.handle_request()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.server_close()


@pytest.fixture
def fake_llm(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "HISTOSYNTH_LLM_BASE_URL", "HISTOSYNTH_LLM_MODEL", "HISTOSYNTH_LLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(script=(), max_requests=40):
        servers.append(FakeLLM(script, max_requests))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


FAST = dict(backoff=0.01, max_backoff=0.05)
REPORTS = {"TCGA-A1": "Invasive ductal carcinoma, grade 2. Margins free.", "TCGA-B2": "Lobular carcinoma in situ."}


def test_summarize_two_steps_and_cache(fake_llm, tmp_path):
    server = fake_llm()
    cache = tmp_path / "summaries.jsonl"
    out = summarize_reports(REPORTS, cache, base_url=server.url, model="fake-gpt", api_key="sk-test", **FAST)
    assert out == {rid: [f"Summary (154 tokens max): {text}"] for rid, text in REPORTS.items()}
    assert len(server.requests) == 4  # key points, then summary, per report
    first, second = server.requests[0], server.requests[1]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "fake-gpt" and "max_tokens" not in first["body"]
    assert first["body"]["messages"][-1]["content"] == KEY_POINTS_PROMPT.format(report=REPORTS["TCGA-A1"])
    msgs = second["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == f"- key point: {REPORTS['TCGA-A1']}" and "75 words" in msgs[3]["content"]
    assert second["body"]["max_tokens"] == 154
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    assert [(r["id"], r["n"]) for r in rows] == [("TCGA-A1", 0), ("TCGA-B2", 0)]
    assert load_summaries(cache) == out


def test_summarize_retries_500_429_and_timeout_then_succeeds(fake_llm, tmp_path):
    server = fake_llm(script=[500, 429, ("sleep", 1.0), "ok", 503, "ok"])
    out = summarize_reports({"r1": "Report one."}, tmp_path / "c.jsonl", base_url=server.url, model="m",
                            timeout=0.4, **FAST)
    assert out == {"r1": ["Summary (154 tokens max): Report one."]}
    assert len(server.requests) == 6  # 3 failed + 1 ok key points, 1 failed + 1 ok summary
    assert server.requests[0]["auth"] is None  # no key: no Authorization header


def test_summarize_permanent_failure_names_the_report(fake_llm, tmp_path):
    server = fake_llm(script=["ok", "ok"] + [500] * 10)
    cache = tmp_path / "c.jsonl"
    with pytest.raises(LLMError, match=r"report 'TCGA-B2'.*failed after 3 attempt\(s\): HTTP 500"):
        summarize_reports(REPORTS, cache, base_url=server.url, model="m", retries=2, **FAST)
    assert len(server.requests) == 2 + 3
    assert list(read_summary_cache(cache)) == ["TCGA-A1"]  # the finished report is kept
    # a refusal (401) is not retried
    server = fake_llm(script=[401])
    with pytest.raises(LLMError, match=r"report 'r': .*refused: HTTP 401"):
        summarize_reports({"r": "x"}, tmp_path / "d.jsonl", base_url=server.url, model="m", **FAST)
    assert len(server.requests) == 1


def test_summarize_resumes_without_requesting_cached_ids(fake_llm, tmp_path, monkeypatch):
    cache = tmp_path / "c.jsonl"
    cache.write_text(json.dumps({"id": "TCGA-A1", "n": 0, "summary": "cached A1"}) + "\n"
                     + '{"id": "TCGA-B2", "n": 0, "summ', encoding="utf-8")  # a torn last line
    server = fake_llm(max_requests=10)
    monkeypatch.setenv("HISTOSYNTH_LLM_BASE_URL", server.url)
    monkeypatch.setenv("HISTOSYNTH_LLM_MODEL", "env-model")
    out = summarize_reports(REPORTS, cache, **FAST)
    assert out["TCGA-A1"] == ["cached A1"] and out["TCGA-B2"][0].endswith(REPORTS["TCGA-B2"])
    assert len(server.requests) == 2 and all("TCGA-A1" not in json.dumps(r["body"]) for r in server.requests)
    assert server.requests[0]["body"]["model"] == "env-model"
    # everything cached: no request at all; more summaries per report: only the new ones
    summarize_reports(REPORTS, cache, **FAST)
    assert len(server.requests) == 2
    out = summarize_reports(REPORTS, cache, summaries_per_report=2, **FAST)
    assert len(server.requests) == 2 + 4 and all(len(v) == 2 for v in out.values())
    assert [json.loads(x)["n"] for x in cache.read_text().splitlines()] == [0, 0, 1, 1]


def test_summarize_needs_an_endpoint(fake_llm, tmp_path):
    with pytest.raises(HistosynthError, match="HISTOSYNTH_LLM_BASE_URL"):
        summarize_reports(REPORTS, tmp_path / "c.jsonl", model="m")
    with pytest.raises(HistosynthError, match="HISTOSYNTH_LLM_MODEL"):
        summarize_reports(REPORTS, tmp_path / "c.jsonl", base_url="http://127.0.0.1:9/v1")


def test_cli_summarize_folder_of_reports(fake_llm, tmp_path):
    server = fake_llm(max_requests=10)
    folder = tmp_path / "reports"
    folder.mkdir()
    for rid, text in REPORTS.items():
        (folder / f"{rid}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "summaries.jsonl"
    args = ["summarize", str(folder), "--out", str(out), "--base-url", server.url, "--model", "m"]
    res = CliRunner().invoke(captions, args)
    assert res.exit_code == 0, res.output
    assert "2 reports, 2 summaries (2 new)" in res.output and len(server.requests) == 4
    res = CliRunner().invoke(captions, args)  # resumed: nothing new
    assert res.exit_code == 0 and "(0 new)" in res.output and len(server.requests) == 4
    res = CliRunner().invoke(captions, ["summarize", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2 and "nope" in res.output
