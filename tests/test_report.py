"""`rag-pipeline report` end to end: outputs committed through the run's own RowWriter (and one real run), the real
CLI in a subprocess, the page opened with `file://` in a real headless Chromium (selenium + chromedriver):
sections present, every image decoded, nothing fetched, no SEVERE console entry, a non-blank screenshot."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.report.page import NO_TOKENS, SECTIONS
from tests.fixtures.llm import requires_llama
from tests.runtools import REPO, run_args, start_run, store_args, write_config, write_records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    _SELENIUM = True
except ImportError:
    _SELENIUM = False

requires_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and _SELENIUM),
    reason="needs Debian's chromium + chromium-driver and selenium (RAG_PIPELINE_TEST_DEPS=1 scripts/setup.sh)",
)
pytestmark = requires_browser

ENDPOINTS = ("http://10.0.0.1:30000", "http://10.0.0.2:30000", "http://10.0.0.3:30000")
TOKEN_FIELDS = {"rag_prompt_tokens": pa.int32(), "rag_completion_tokens": pa.int32(),
                "gen_prompt_tokens": pa.int32(), "gen_completion_tokens": pa.int32(),
                "rag_finish_reason": pa.string(), "gen_finish_reason": pa.string()}
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--window-size=1300,1000")


def write_output(out: Path, n: int, part_rows: int, *, tokens: bool, shard: str | None = None,
                 seed: int = 0) -> None:
    """Commit ``n`` rows through the run's RowWriter into ``out``: three endpoints, every status, grouped and
    HTML-looking errors, lognormal latencies; with ``tokens`` the token columns too. Parts get commit times
    (mtimes) 40 s apart, as a run committing a part every 40 s would leave."""
    from pipeline.config import Config
    from pipeline.messages import GenResult, RagResult, WorkItem
    from pipeline.output import OutputDir, input_fingerprint
    from pipeline.run.rows import RowWriter

    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    inp = out.parent / f"{out.name}-input.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "query": f"question {i}"}) + "\n" for i in range(n)))
    od = OutputDir(out)
    od.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=shard, total_records=n,
               config=Config().to_dict(), overwrite=False)

    def add_tokens(_item, _rag, _gen, row: dict) -> None:
        row.update(rag_prompt_tokens=rng.randint(300, 1200), rag_completion_tokens=rng.randint(5, 64),
                   rag_finish_reason="length" if rng.random() < 0.1 else "stop")
        if row["gen_status"] != "skipped":
            row.update(gen_prompt_tokens=rng.randint(400, 1500), gen_completion_tokens=rng.randint(10, 256),
                       gen_finish_reason="length" if rng.random() < 0.2 else "stop")

    writer = RowWriter(od, {}, part_rows=part_rows, on_row=add_tokens if tokens else None)
    if tokens:
        for name, typ in TOKEN_FIELDS.items():
            if name not in writer.schema.names:
                writer.schema = writer.schema.append(pa.field(name, typ))
    for i in range(n):
        ep = ENDPOINTS[i % len(ENDPOINTS)]
        lat = lambda mu: round(math.exp(rng.gauss(mu, 0.5)), 3)  # noqa: E731
        rag = RagResult(id=f"q{i}", contexts=[{"doc_id": "d1", "chunk_id": "d1#0", "text": "t", "score": 0.5}],
                        rag_answer="answer", retrieve_ms=lat(3.5), rag_llm_ms=lat(6.5), attempts=1, endpoint=ep,
                        model="SmolLM2-135M-Instruct")
        gen: GenResult | None = GenResult(id=f"q{i}", generation="text", generate_ms=lat(7.0), attempts=1,
                                          endpoint=ep, model="SmolLM2-135M-Instruct")
        if i % 20 == 0:
            rag.rag_status, rag.rag_error, gen = "hard_fail", f"LLM timeout after 3 attempts <on> {ep}", None
        elif i % 10 == 3:
            rag.rag_status, rag.rag_error = "soft_fail", "no passage above retrieval.min_score"
        if gen is not None and i % 25 == 7:
            gen.gen_status, gen.gen_error = "failed", "HTTP 500 Internal Server Error"
        writer.finish(WorkItem(id=f"q{i}", query=f"question {i}"), rag, gen)
    writer.commit()
    t0 = 1_780_000_000.0
    for k, part in enumerate(od.parts()):
        os.utime(part, (t0 + 40 * k, t0 + 40 * k))


def report(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(out), *extra], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    for a in (*CHROME_ARGS, f"--user-data-dir={profile}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def check_in_browser(driver, page: Path, shot: Path, n_images: int) -> str:
    """Open ``page`` with file://, check sections, images, fetches and console; save a full-page screenshot to
    ``shot``. Returns the page's visible text."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(page.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    for sec in SECTIONS:
        el = driver.find_element(By.ID, sec)
        assert el.is_displayed() and el.find_element(By.TAG_NAME, "h2").text
    imgs = driver.find_elements(By.TAG_NAME, "img")
    assert len(imgs) == n_images
    for img in imgs:
        loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        assert loaded and loaded > 0, img.get_attribute("id")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
    assert fetched == [], fetched  # nothing fetched: self-contained
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(int(height) + 50, 16_000))
    assert driver.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 1000
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, "blank screenshot"  # None: more than 2^20 colours
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100
    driver.set_window_size(1300, 1000)
    return driver.find_element(By.TAG_NAME, "body").text


def test_report_of_outputs_with_and_without_token_columns_in_a_browser(tmp_path, browser):
    with_tokens = tmp_path / "tokens"
    write_output(with_tokens, 400, 25, tokens=True)
    res = report(with_tokens)
    assert res.returncode == 0, res.stderr
    page = with_tokens / ".rag-pipeline/report.html"
    assert f"wrote {page}" in res.stdout and "400 rows" in res.stdout
    text = check_in_browser(browser, page, tmp_path / "tokens.png", n_images=6)
    assert NO_TOKENS not in text
    for col in TOKEN_FIELDS:
        assert col in text
    assert "LLM timeout after 3 attempts <on> http://10.0.0.1:30000" in text  # escaped, shown as text
    assert "400 of 400 records expected (100.0%)" in text
    assert "committed parts 16" in text

    # a sharded root (two shards, no token columns), report written elsewhere with -o
    root = tmp_path / "sharded"
    write_output(root / "shard-0-of-2", 150, 50, tokens=False, shard="0/2", seed=1)
    write_output(root / "shard-1-of-2", 150, 50, tokens=False, shard="1/2", seed=2)
    res = report(root, "-o", str(tmp_path / "sharded.html"), "--top-errors", "2")
    assert res.returncode == 0, res.stderr
    assert not (root / ".rag-pipeline/report.html").exists()
    text = check_in_browser(browser, tmp_path / "sharded.html", tmp_path / "sharded.png", n_images=4)
    assert NO_TOKENS in text
    assert "300 of 300 records expected" in text and "run directories 2" in text
    assert "HTTP 500 Internal Server Error" in text


def test_report_errors_are_one_line_with_exit_2(tmp_path):
    res = report(tmp_path / "missing")
    assert res.returncode == 2 and res.stderr.startswith("Error: ") and "Traceback" not in res.stderr
    assert "output directory not found" in res.stderr
    (tmp_path / "empty").mkdir()
    res = report(tmp_path / "empty")
    assert res.returncode == 2 and "not a rag-pipeline output" in res.stderr
    out = tmp_path / "run"
    write_output(out, 20, 10, tokens=False)
    res = report(out, "-o", str(tmp_path / "no" / "such" / "dir" / "r.html"))
    assert res.returncode == 2 and "cannot write the report" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@requires_llama
@pytest.mark.slow
def test_report_of_a_real_run(tmp_path, browser, example_store, llama_endpoints):
    records = write_records(tmp_path, 6)
    out = tmp_path / "out"
    proc, _ = start_run(run_args(records, out, write_config(tmp_path), "--endpoints", ",".join(llama_endpoints),
                                 *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    res = report(out)
    assert res.returncode == 0, res.stderr
    has_tokens = any(c in pq.read_schema(p).names for p in out.glob("part-*.parquet") for c in TOKEN_FIELDS)
    text = check_in_browser(browser, out / ".rag-pipeline/report.html", tmp_path / "real.png", n_images=6 if has_tokens else 4)
    assert "6 of 6 records expected (100.0%)" in text and "run directories 1 (1 complete)" in text
    assert any(ep in text for ep in llama_endpoints)
    assert (NO_TOKENS in text) != has_tokens
