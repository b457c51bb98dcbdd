"""`strop ui` in a real browser: Debian's headless Chromium driven by selenium through chromium-driver.

Marked `browser` (left out of the default run; `make test` and CI run it). Without chromium and
chromium-driver these tests fail, they do not skip: `apt-get install -y chromium chromium-driver`.
STROP_UI_SCREENSHOTS=DIR saves each page's screenshot there (docs/ui holds the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from test_ui import CURVE, TOKEN, dashboard, plant, tiny_yaml, train_tiny

pytestmark = pytest.mark.browser
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 60  # seconds for anything the page does (a tiny run trains in a few)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_llama, browser):
    """A dashboard over planted runs and a trained one, the browser holding its token cookie."""
    home = tmp_path_factory.mktemp("ui-browser")
    root = home / "runs"
    trained = train_tiny(root, tiny_llama, "tuned")
    shutil.copytree(trained, root / "tuned-lr")  # a second run to compare, one setting apart
    cfg = yaml.safe_load((root / "tuned-lr" / "config.yaml").read_text())
    cfg["name"], cfg["optim"]["lr"] = "tuned-lr", 0.05
    (root / "tuned-lr" / "config.yaml").write_text(yaml.safe_dump(cfg))
    plant(root, "stopped-run", CURVE, checkpoint=2)
    plant(root, "failed-run", CURVE[:1])
    plant(root, "live-run", CURVE, old=False)
    with dashboard(root) as d:
        browser.get(f"{d.url}/?token={TOKEN}")  # sets the cookie, redirects to /
        d.config = tiny_yaml(home, tiny_llama)
        d.browser = browser
        yield d


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda _: condition(), message=what)


def shot(driver, name: str) -> None:
    folder = os.environ.get("STROP_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def table(driver) -> dict[str, str]:
    """The runs table as shown: run id -> status."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    return {r.get_attribute("data-run"): r.find_elements(By.TAG_NAME, "td")[4].text for r in rows}


def test_runs_table_lists_the_planted_runs_filters_and_sorts(ui):
    from selenium.webdriver.common.by import By

    b = ui.browser
    b.get(ui.url + "/")
    expected = {
        "tuned": "finished",
        "tuned-lr": "finished",
        "stopped-run": "stopped",
        "failed-run": "failed",
        "live-run": "running",
    }
    wait(b, lambda: table(b) == expected, "the five planted runs with their statuses")
    shot(b, "runs")
    b.find_element(By.ID, "filter").send_keys("fail")
    wait(b, lambda: list(table(b)) == ["failed-run"], "the filter keeps only the failed run")
    b.find_element(By.ID, "filter").clear()
    b.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    b.find_element(By.CSS_SELECTOR, 'th[data-key="name"]').click()  # ascending by run
    wait(b, lambda: list(table(b)) == sorted(expected), "sorted by run name")
    b.find_element(By.CSS_SELECTOR, 'th[data-key="name"]').click()
    wait(b, lambda: list(table(b)) == sorted(expected, reverse=True), "sorted by run name, descending")


def _points(driver, series: str) -> int:
    return driver.execute_script(
        "const p = document.querySelector(`#charts polyline[data-series='${arguments[0]}']`);"
        "return p ? p.getAttribute('points').trim().split(' ').length : 0;",
        series,
    )


def test_run_page_curves_follow_metrics_jsonl_without_a_reload(ui):
    b = ui.browser
    b.get(ui.url + "/run/live-run")
    wait(b, lambda: _points(b, "loss") == 2 and _points(b, "val_loss") == 1, "the planted curve drawn")
    b.execute_script("window.sameDocument = true")  # gone if the page reloads
    with open(ui.root / "live-run" / "metrics.jsonl", "a") as f:
        for step in (3, 4, 5):
            f.write(json.dumps({"step": step, "loss": 3.0 - 0.1 * step}) + "\n")
        f.write(json.dumps({"step": 5, "val_loss": 2.4}) + "\n")
    wait(b, lambda: _points(b, "loss") == 5 and _points(b, "val_loss") == 2, "the appended steps drawn")
    assert b.execute_script("return window.sameDocument") is True
    b.get(ui.url + "/run/tuned")  # a finished run: report, config, samples, checkpoints
    wait(b, lambda: _points(b, "loss") == 4, "the trained run's curve")
    page = b.find_element("id", "run").text
    assert "Evaluation samples" in page and "step-000004" in page and "What is" in page
    assert (
        not b.find_element("id", "stop").is_displayed() and not b.find_element("id", "resume").is_displayed()
    )
    shot(b, "run")
    samples = [json.loads(x) for x in (ui.root / "tuned" / "eval" / "samples.jsonl").read_text().splitlines()]
    wanted = samples[-1]["input"]
    b.find_element("id", "sample-filter").send_keys(wanted)
    shown = [r.text for r in b.find_elements("css selector", "#samples tbody tr") if r.is_displayed()]
    assert shown and all(wanted in r for r in shown)
    assert len(shown) == sum(wanted in " ".join(map(str, s.values())) for s in samples) < len(samples)
    b.get(ui.url + "/run/stopped-run")  # a checkpoint and no job: resumable, nothing to stop
    wait(b, lambda: b.find_element("id", "resume").is_displayed(), "the resume button")
    assert not b.find_element("id", "stop").is_displayed()


def test_start_form_rejects_a_bad_value_with_the_keys_message(ui):
    from selenium.webdriver.common.by import By

    from strop.core.config import load_config
    from strop.core.errors import ConfigError

    with pytest.raises(ConfigError) as cli:  # what `strop train CONFIG --set optim.lr=fast` says
        load_config(ui.config, ["optim.lr=fast", f"output_dir={ui.root}"])
    b = ui.browser
    b.get(f"{ui.url}/start?base={ui.config}")
    lr = b.find_element(By.NAME, "optim.lr")
    lr.clear()
    lr.send_keys("fast")
    b.find_element(By.ID, "check").click()
    box = b.find_element(By.ID, "form-error")
    wait(b, lambda: box.is_displayed() and box.text, "the error shown")
    assert box.text == f"error: {cli.value}"
    assert "optim.lr: input should be a valid number" in box.text
    field = b.find_element(By.CSS_SELECTOR, '.field[data-key="optim.lr"]')
    assert "invalid" in field.get_attribute("class")
    assert field.find_element(By.CLASS_NAME, "field-error").text.startswith("input should be a valid number")
    assert not b.find_element(By.ID, "launch").is_enabled()
    b.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    shot(b, "start")


def test_a_tiny_run_started_from_the_page_finishes_and_appears_in_the_table(ui):
    from selenium.webdriver.common.by import By

    b = ui.browser
    b.get(f"{ui.url}/start?base={ui.config}")
    for key, value in (("name", "from-page"), ("train.max_steps", "3")):
        field = b.find_element(By.NAME, key)
        field.clear()
        field.send_keys(value)
    b.find_element(By.ID, "check").click()
    launch = b.find_element(By.ID, "launch")
    wait(b, launch.is_enabled, "the data check passed")
    findings = b.find_element(By.ID, "check-text").text
    assert findings.startswith("strop data check") and "OK: 0 error(s)" in findings
    assert "--set train.max_steps=3" in b.find_element(By.ID, "command").text
    launch.click()
    wait(b, lambda: b.current_url.endswith("/run/from-page"), "the run page opened")
    wait(b, lambda: b.find_element(By.ID, "status").text == "finished", "the run finished")
    b.get(ui.url + "/")
    wait(b, lambda: table(b).get("from-page") == "finished", "the new run listed as finished")
    assert (ui.root / "from-page" / "model" / "strop_model.json").is_file()


def test_chat_page_streams_a_reply_from_a_finished_run(ui):
    from selenium.webdriver.common.by import By

    from strop.models.generate import generate
    from strop.models.inference import load_for_inference

    b = ui.browser
    b.get(ui.url + "/try/tuned")
    # count the reply's updates as they land: more than one is a stream, not one answer at the end
    b.execute_script(
        "window.updates = 0; new MutationObserver(() => window.updates++)"
        ".observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true})"
    )
    temperature = b.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    b.find_element(By.ID, "message").send_keys("What is 3 times 4?")
    b.find_element(By.ID, "send").click()
    reply = lambda: b.find_elements(By.CSS_SELECTOR, ".turn.assistant")  # noqa: E731
    wait(b, lambda: reply() and "streaming" not in reply()[0].get_attribute("class"), "the reply ended")
    assert not b.find_element(By.ID, "try-error").is_displayed()
    shot(b, "chat")
    loaded = load_for_inference(str(ui.root / "tuned"), device="cpu")
    messages = [{"role": "user", "content": "What is 3 times 4?"}]
    expected = generate(loaded.model, loaded.template, [messages], 128, 0.0, 1.0)[0]
    assert reply()[0].get_attribute("textContent").strip() == expected.strip()
    assert b.execute_script("return window.updates") > 3  # user turn, empty reply, then its pieces


def test_compare_page_shows_strop_compare_for_the_chosen_runs(ui):
    from selenium.webdriver.common.by import By

    b = ui.browser
    b.get(ui.url + "/compare")
    for rid in ("tuned", "tuned-lr"):
        b.find_element(By.CSS_SELECTOR, f'input[name="run"][value="{rid}"]').click()
    b.find_element(By.CSS_SELECTOR, "#compare-form button").click()
    frame = wait(b, lambda: b.find_elements(By.ID, "comparison"), "the comparison shown")[0]
    b.switch_to.frame(frame)
    try:
        wait(b, lambda: "Config differences" in b.find_element(By.TAG_NAME, "body").text, "compare's page")
        text = b.find_element(By.TAG_NAME, "body").text
        assert "Comparison of 2 runs" in text and "optim.lr" in text
    finally:
        b.switch_to.default_content()
    shot(b, "compare")


@contextmanager
def listener():
    """A loopback HTTP server recording the paths it is asked for: where a planted script would call."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        thread.join(10)


PLANTED = """<!doctype html><html><head><title>planted</title></head><body><h1 id="planted">planted</h1>
<script>
document.title = "ran";
document.body.append(Object.assign(document.createElement("p"), {id: "ran"}));
try { parent.document.title = "ran"; } catch (e) {}
new Image().src = "LISTENER/image";
fetch("LISTENER/fetch", {mode: "no-cors"});
fetch("/api/start", {method: "POST", headers: {"Content-Type": "application/json"},
  body: JSON.stringify({base: "CONFIG", values: {name: "planted-ran"}})});
</script>
<img id="last" src="LISTENER/img" onerror="document.title = 'ran'" alt="x">
</body></html>"""


def test_a_planted_reports_script_does_not_run(ui):
    """A report.html copied into the runs folder with a script that would retitle the page and the
    dashboard, call a loopback listener and start a job with the dashboard's cookie: none of it happens,
    in the run page's frame or opened on its own; strop's own report still shows its embedded plots."""
    from selenium.webdriver.common.by import By

    b = ui.browser
    with listener() as (address, hits):
        run = plant(ui.root, "planted", CURVE)
        (run / "report.html").write_text(
            PLANTED.replace("LISTENER", address).replace("CONFIG", str(ui.config))
        )
        b.get(ui.url + "/run/planted")
        frame = wait(b, lambda: b.find_elements(By.ID, "report"), "the report's frame")[0]
        b.switch_to.frame(frame)
        try:
            # the image after the script is parsed: the script had its turn (had it been allowed)
            wait(b, lambda: b.find_elements(By.ID, "last"), "the planted report shown")
            assert b.find_element(By.ID, "planted").text == "planted"
            title = b.find_element(By.TAG_NAME, "title").get_attribute("textContent")  # the frame's
            assert not b.find_elements(By.ID, "ran") and title == "planted"
        finally:
            b.switch_to.default_content()
        assert b.title == "strop · planted"
        b.get(ui.url + "/report/planted")  # on its own, outside the dashboard's sandboxed frame
        wait(b, lambda: b.find_elements(By.ID, "last"), "the planted report opened on its own")
        assert not b.find_elements(By.ID, "ran") and b.title == "planted"
        time.sleep(1.0)  # time for a request it might have sent
        b.get(address + "/control")  # the listener hears this browser: its silence above means something
        wait(b, lambda: hits, "the control request")
        assert hits == ["/control"]
    assert ui.jobs.get("planted-ran") is None and not (ui.root / "planted-ran").exists()
    b.get(ui.url + "/run/tuned")  # strop's own report, sandboxed too, still shows its plots
    b.switch_to.frame(wait(b, lambda: b.find_elements(By.ID, "report"), "the report's frame")[0])
    try:
        images = wait(b, lambda: b.find_elements(By.TAG_NAME, "img"), "the report's plots")
        assert all(img.get_property("naturalWidth") > 0 for img in images)
        assert "Training" in b.find_element(By.TAG_NAME, "body").text
    finally:
        b.switch_to.default_content()
