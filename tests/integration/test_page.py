"""The swarm page in a real headless browser (Debian's chromium driven by Playwright) against a real 3-server swarm
and a real `corolla api` process: server rows, the block chart, a stopped server's blocks marked missing, a chat
answer streamed in; screenshots saved. Also `corolla health` on the terminal and as a page on its own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from corolla.testing.api_process import start_http_process, stop_process
from corolla.testing.local_swarm import LocalSwarm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(os.environ.get("COROLLA_SCREENSHOTS", "/tmp/corolla-screenshots"))


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs Playwright for Python (scripts/setup.sh installs it)")
    if CHROMIUM is None:
        pytest.skip("the browser test needs Debian's chromium (scripts/setup.sh installs it where apt-get can run "
                    "as root); none was found on this machine")
    return sync_playwright()


@pytest.fixture(scope="module")
def swarm():
    with LocalSwarm(num_servers=3) as swarm:
        yield swarm


def test_health_prints_the_swarm_table(swarm):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "corolla.cli.main", "health", "--initial-peers",
                             *swarm.initial_peers], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "30 blocks, 3 server(s), 3 online and answering" in lines[0]
    assert sum(1 for line in lines[1:] if " online " in line) == 3
    assert "servers per block: " + " ".join(["1"] * 30) in result.stdout
    assert "blocks served by nobody: none" in result.stdout
    assert "models in the DHT: smollm2-135m-instruct (3)" in result.stdout


def test_swarm_page_in_a_real_browser(swarm, tmp_path):
    playwright_context = _browser()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    api, url = start_http_process(tmp_path, "api", swarm.initial_peers, "--num-threads", "1")
    page_only, page_url = start_http_process(tmp_path, "health", swarm.initial_peers)
    try:
        with urllib.request.urlopen(url + "/api/swarm", timeout=60) as response:
            data = json.load(response)
        assert len(data["servers"]) == 3 and data["missing_blocks"] == [] and data["num_blocks"] == 30
        assert all(s["rtt_ms"] is not None for s in data["servers"])
        with playwright_context as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(url + "/")
                page.wait_for_function("document.querySelectorAll('#servers tbody tr[data-peer]').length === 3",
                                       timeout=30000)
                assert page.locator("#block-chart .col").count() == 30
                assert page.locator("#block-chart .col.missing").count() == 0
                assert page.locator("#servers tbody tr.online").count() == 3
                page.screenshot(path=str(SCREENSHOTS / "swarm-page.png"), full_page=True)

                # the chat box streams an answer from the API
                page.fill("#chat-input", "Say hello in one short sentence.")
                page.click("#chat-send")
                page.wait_for_function(
                    "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant')"
                    ".textContent.length > 0 && !document.getElementById('chat-send').disabled", timeout=120000)
                answer = page.locator(".msg.assistant").first.text_content()
                assert answer.strip() and not answer.startswith("error")
                page.screenshot(path=str(SCREENSHOTS / "swarm-page-chat.png"), full_page=True)

                # a phone-sized screen: the page fits its width (the table scrolls inside its own box)
                phone = browser.new_page(viewport={"width": 390, "height": 844})
                phone.goto(page_url + "/")  # the page-only server: no chat there
                phone.wait_for_function("document.querySelectorAll('#servers tbody tr[data-peer]').length === 3",
                                        timeout=30000)
                assert phone.evaluate("document.documentElement.scrollWidth") <= 390
                assert phone.locator("#chat-section").is_hidden()
                phone.screenshot(path=str(SCREENSHOTS / "swarm-page-phone.png"), full_page=True)

                # a server stops: its blocks are marked missing, its row says it is gone
                stopped = swarm.servers[1]
                stopped.process.terminate()
                stopped.process.wait(60)
                page.wait_for_function("document.querySelectorAll('#block-chart .col.missing').length === 10",
                                       timeout=60000)
                assert "10:20" in page.locator("#missing").text_content()
                page.screenshot(path=str(SCREENSHOTS / "swarm-page-missing.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop_process(api)
        stop_process(page_only)
    for name in ("swarm-page.png", "swarm-page-chat.png", "swarm-page-phone.png", "swarm-page-missing.png"):
        assert (SCREENSHOTS / name).stat().st_size > 10_000


def test_health_does_not_count_a_server_that_does_not_answer(tiny_llama_dir):
    """A server killed without a word stays in the DHT until its record expires: `corolla health` pings it, marks
    it "no answer" and counts its blocks as served by nobody (it counted them as served)."""
    with LocalSwarm(model=str(tiny_llama_dir), num_servers=2, num_threads=1, dht_prefix="deaf") as tiny:
        dead = tiny.servers[1]
        dead.process.kill()
        dead.process.wait(30)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "corolla.cli.main", "health", str(tiny_llama_dir),
                                 "--dht-prefix", "deaf", "--initial-peers", *tiny.initial_peers],
                                capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 blocks, 2 server(s), 1 online and answering" in result.stdout, result.stdout
    assert sum(1 for line in result.stdout.splitlines() if " no answer " in line) == 1, result.stdout
    assert "servers per block: 1 1 0 0" in result.stdout and "blocks served by nobody: 2:4" in result.stdout
