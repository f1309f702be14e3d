"""pipeline=web: the page logic without a browser, then the real app in a headless Chromium (Selenium).

The browser tests need the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them); without
them they fail and say how to install them. Screenshots of each page go to outputs/test-artifacts/web/.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qlora_lab import web_pages
from qlora_lab.config import DatasetConfig, GenerationConfig
from qlora_lab.data import encode, render_prompt
from qlora_lab.inference import generate, load_for_inference
from qlora_lab.pipelines.web import ModelSlot, conversation_ids, generation_settings, stream_reply
from qlora_lab.report import write_report

from .conftest import ROOT, TINY, cli, make_cfg

ARTIFACTS = ROOT / "outputs" / "test-artifacts" / "web"
GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """An outputs folder with one tiny trained run (eval loss before and after) and a one-job sweep report."""
    out = tmp_path_factory.mktemp("web") / "outputs"
    run_dir = out / "tiny" / "run1"
    result = cli(*TINY, "quantization=none", "train.max_steps=4", f"paths.output_dir={out}",
                 f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(run_dir, out / "tiny" / "run2", ignore=shutil.ignore_patterns("checkpoints"))  # loses its adapter
    job = out / "multirun" / "demo" / "0_quantization=none"
    shutil.copytree(run_dir, job, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    write_report(job.parent)
    return out


# ---------------------------------------------------------------- page logic, no browser

def write_job(path: Path, stages: list[str], metrics: dict, status: str = "completed", started: str = "") -> None:
    (path / ".hydra").mkdir(parents=True)
    cfg = {"model": {"name_or_path": "m"}, "quantization": {"method": "nf4"}, "dataset": {"name": "alpaca", "size": 8},
           "pipeline": {"stages": stages}}
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    (path / "run.json").write_text(json.dumps({"status": status, "started_at": started, "error": "boom"}))
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_runs_table_lists_runs_newest_first_without_the_web_app_itself(tmp_path):
    write_job(tmp_path / "a" / "old", ["train"], {"eval/loss_before": 2.5, "eval/loss": 1.25},
              started="2026-11-01T10:00:00+00:00")
    write_job(tmp_path / "multirun" / "s" / "0_x=1", ["train"], {}, status="failed",
              started="2026-11-02T10:00:00+00:00")
    write_job(tmp_path / "run" / "web", ["web"], {}, started="2026-11-03T10:00:00+00:00")
    (tmp_path / "a" / "old" / "adapter").mkdir()  # a run's own subfolders are not runs
    rows = web_pages.runs_table(tmp_path)
    assert [r["run"] for r in rows] == ["multirun/s/0_x=1", "a/old"]
    old = rows[1]
    assert old == {"run": "a/old", "date": "2026-11-01 10:00", "model": "m", "quantization": "nf4",
                   "dataset": "alpaca (8)", "stages": "train", "status": "completed",
                   "eval loss before": "2.5000", "eval loss after": "1.2500"}
    assert rows[0]["status"] == "failed: boom" and rows[0]["eval loss after"] == "–"
    assert web_pages.runs_table(tmp_path / "missing") == []


def test_inference_modes_follow_the_files_a_run_has(tmp_path):
    assert web_pages.inference_modes(None) == ["base"]
    assert web_pages.inference_modes(tmp_path) == ["base"]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert web_pages.inference_modes(tmp_path) == ["adapter", "merge_and_unload", "base"]
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert web_pages.inference_modes(tmp_path) == ["adapter", "merge_and_unload", "merged", "base"]


def test_run_details_of_a_trained_run(outputs):
    details = web_pages.run_details(outputs / "tiny" / "run1")
    metrics = json.loads((outputs / "tiny" / "run1" / "metrics.json").read_text())
    assert details["metrics"] == metrics and "tiny-random-llama" in details["config"]
    assert "pipeline=evaluate" in details["evaluation"]  # no evaluation yet: says how to get one
    history = details["history"]
    assert [step for step, _ in history["train"]] == [1, 2, 3, 4]
    assert history["eval"][0] == (0, pytest.approx(metrics["eval/loss_before"]))
    assert history["eval"][-1] == (4, pytest.approx(metrics["eval/loss"]))
    figure = web_pages.loss_figure(history, "run1")
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["train loss", "eval loss"]
    assert web_pages.loss_figure({"train": [], "eval": []}, "none") is None


def test_sweep_page_shows_the_report_and_its_plots(outputs):
    sweeps = web_pages.sweep_dirs(outputs)
    assert sweeps == [outputs / "multirun" / "demo"]
    text, plots = web_pages.sweep_page(sweeps[0])
    assert text == (sweeps[0] / "summary.md").read_text() and "LoRA vs QLoRA" in text
    assert [p.name for p in plots] == ["eval_loss.png", "learning_curves.png", "peak_memory.png", "time_vs_size.png"]


def test_conversation_is_rendered_as_in_training_and_trimmed_to_fit(tokenizer):
    d = DatasetConfig()
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        messages += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    ids, kept = conversation_ids(messages, tokenizer, d, max_new_tokens=16, max_len=10_000)
    assert kept == messages
    assert tokenizer.decode(ids[0]) == render_prompt(messages, tokenizer, d)
    short, kept = conversation_ids(messages, tokenizer, d, max_new_tokens=16, max_len=ids.shape[1] - 40)
    # the oldest exchanges go first; the system prompt and the newest message stay
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and len(kept) < len(messages)
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]
    assert short.shape[1] + 16 <= ids.shape[1] - 40


def test_stream_reply_streams_what_generate_returns(outputs):
    cfg = make_cfg([*TINY, "quantization=none"])
    slot = ModelSlot(cfg, None)
    loaded = slot.get(None, "base")
    prompt = render_prompt([{"role": "user", "content": "Name a colour."}], loaded.tokenizer, cfg.dataset)
    ids = encode(prompt, loaded.tokenizer, return_tensors="pt")["input_ids"]
    steps = list(stream_reply(loaded, ids, GREEDY))
    texts = [text for text, _ in steps]
    assert len({t for t in texts[:-1] if t}) >= 2  # the answer grows piece by piece
    final, stats = steps[-1]
    expected = generate(loaded.model, loaded.tokenizer, [prompt], GREEDY, 1)[0]
    assert final == expected["output"].strip() and stats["new_tokens"] == expected["new_tokens"]
    assert 0 < stats["ttft_s"] <= stats["seconds"] and stats["tokens_per_s"] > 0


def test_a_failed_generation_is_raised_to_the_page(outputs):
    slot = ModelSlot(make_cfg([*TINY, "quantization=none"]), None)
    loaded = slot.get(None, "base")
    ids = torch.tensor([[1, 2, 3]])
    gen = generation_settings(GREEDY, False, 1.0, 50, 1.0, 4, 1.0)
    loaded.model.generate = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("device on fire"))
    with pytest.raises(RuntimeError, match="device on fire"):
        list(stream_reply(loaded, ids, gen))


def test_model_slot_holds_one_model_at_a_time(outputs):
    run_dir = outputs / "tiny" / "run1"
    cfg = make_cfg([*TINY, "quantization=none", f"run_dir={run_dir}"])
    slot = ModelSlot(cfg, run_dir)
    first = slot.get(run_dir, "adapter")
    assert slot.get(run_dir, "adapter") is first  # the same request reuses the loaded model
    gone = weakref.ref(first.model)
    del first
    second = slot.get(run_dir, "base")
    gc.collect()
    assert gone() is None and second.key == (str(run_dir), "base")
    assert not hasattr(second.model, "peft_config")


def test_adapter_mode_loads_what_the_run_trained(outputs):
    """The slot loads a run chosen in the page with that run's own config (here: not the job's)."""
    run_dir = outputs / "tiny" / "run1"
    slot = ModelSlot(make_cfg(["quantization=nf4"]), None)  # the job's own settings differ from the run's
    cfg = slot.run_config(run_dir)
    assert cfg.model.name_or_path == "tiny-random-llama" and cfg.quantization.method.value == "none"
    loaded = slot.get(run_dir, "adapter")
    reference, _ = load_for_inference(cfg, run_dir, "adapter")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)


# ---------------------------------------------------------------- the real app in a real browser

def browser_paths() -> tuple[str, str]:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("the web app's browser tests need Chromium and its driver: install them with "
                    "`sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu; .ci/run does this), or "
                    "point CHROMIUM= and CHROMEDRIVER= at a matching pair.")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_in_use_is_refused_in_one_sentence():
    from qlora_lab.config import ConfigError
    from qlora_lab.pipelines.web import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^web.host=127.0.0.1 web.port={port} cannot be served .*; pick a "
                                              rf"free port with web.port=N, or a local address for web.host.$"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again


@pytest.fixture(scope="module")
def app_url(outputs, tmp_path_factory):
    """`python -m qlora_lab pipeline=web` on a free port, stopped with Ctrl-C (SIGINT) at the end."""
    run_dir = outputs / "tiny" / "run1"
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    job = tmp_path_factory.mktemp("web_job")
    proc = subprocess.Popen([sys.executable, "-m", "qlora_lab", "pipeline=web", f"run_dir={run_dir}",
                             "model=tiny_random", "generation.max_new_tokens=48", f"web.port={port}",
                             f"paths.output_dir={outputs}", f"hydra.run.dir={job}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("web app: http"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120):
        proc.kill()
        pytest.fail("the web app did not print its URL within 120 s:\n" + "".join(lines)[-3000:])
    url = next(line for line in lines if line.startswith("web app: http")).split()[2]
    assert url == f"http://127.0.0.1:{port}"
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0, "".join(lines)[-3000:]
    assert "web app stopped" in "".join(lines)
    assert json.loads((job / "run.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def browser(app_url):
    chromium, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # the system browser and driver: nothing is downloaded
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.get(app_url)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield browser
    browser.quit()


def wait_for(condition, timeout: float = 60, what: str = ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def text_of(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def open_tab(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(lambda: browser.find_elements(By.XPATH, f"//button[@role='tab'][contains(., '{name}')]"),
             what=f"the {name} tab")[0].click()


def test_chat_page_streams_a_reply(browser):
    from selenium.webdriver.common.by import By

    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), what="the chat input")
    # every change of the reply's text in the page, as the browser renders it
    browser.execute_script("""
        window.replyLengths = [];
        const root = document.querySelector('#chat-history');
        new MutationObserver(() => {
            const bots = root.querySelectorAll('[data-testid="bot"]');
            if (bots.length) window.replyLengths.push(bots[bots.length - 1].textContent.trim().length);
        }).observe(root, {subtree: true, childList: true, characterData: true});""")
    browser.find_element(By.CSS_SELECTOR, "#chat-input textarea").send_keys("Say hello.")
    browser.find_element(By.ID, "chat-send").click()
    status = wait_for(lambda: (s := text_of(browser, "chat-status")) and ("tokens/s" in s or "error" in s) and s,
                      what="the reply's status line")
    assert "error" not in status and "adapter model" in status and "time to first token" in status, status
    reply = browser.find_elements(By.CSS_SELECTOR, '#chat-history [data-testid="bot"]')[-1].text.strip()
    assert reply and "Say hello." in text_of(browser, "chat-history")
    lengths = [n for n in browser.execute_script("return window.replyLengths") if n]
    assert len(set(lengths)) >= 2 and sorted(lengths) == lengths, lengths  # it grew in the page: streamed
    browser.save_screenshot(str(ARTIFACTS / "chat.png"))
    browser.find_element(By.ID, "chat-reset").click()
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, '#chat-history [data-testid="bot"]'),
             what="the reset to clear the conversation")


def test_a_failed_load_shows_its_error_and_the_app_keeps_serving(browser, outputs):
    from selenium.webdriver.common.by import By

    choose(browser, "run-select", "tiny/run2")
    time.sleep(3)  # let the page finish switching runs (it lists run2's modes from its files) before the files go
    shutil.rmtree(outputs / "tiny" / "run2" / "adapter")  # gone after the page listed it
    browser.find_element(By.CSS_SELECTOR, "#chat-input textarea").send_keys("Hello?")
    browser.find_element(By.ID, "chat-send").click()
    status = wait_for(lambda: "error" in (s := text_of(browser, "chat-status")) and s, what="the error in the page")
    assert "run2 has no trained adapter" in status, status
    browser.save_screenshot(str(ARTIFACTS / "chat_error.png"))
    choose(browser, "run-select", "tiny/run1")
    browser.find_element(By.ID, "chat-send").click()  # the message was handed back to the box
    wait_for(lambda: "tokens/s" in text_of(browser, "chat-status"), what="a reply from the other run")
    browser.find_element(By.ID, "chat-reset").click()


def choose(browser, element_id: str, value: str) -> None:
    """Pick an option of a Gradio dropdown as a user does: open it, click the option."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"#{element_id} input").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f'#{element_id} li[role="option"][aria-label="{value}"]'),
             what=f"option {value} of {element_id}")[0].click()


def compare_answers(browser, left: str, right: str, timeout: float = 60) -> tuple[tuple[str, str], tuple[str, str]]:
    """Click the button; wait until each side shows its mode's numbers; ((stats, answer) left, (stats, answer) right)."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "sbs-send").click()
    wait_for(lambda: all(text_of(browser, f"{side}-stats").startswith(f"{mode}: ")
                         and "tokens/s" in text_of(browser, f"{side}-stats")
                         for side, mode in (("sbs-a", left), ("sbs-b", right))), timeout, "both answers' numbers")
    return tuple((text_of(browser, f"{side}-stats"),
                  browser.find_element(By.CSS_SELECTOR, f"#{side} textarea").get_attribute("value"))
                 for side in ("sbs-a", "sbs-b"))


def test_side_by_side_page_shows_two_answers(browser):
    from selenium.webdriver.common.by import By

    open_tab(browser, "Side by side")
    box = wait_for(lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "#sbs-input textarea") if b.is_displayed()],
                   what="the side-by-side prompt")[0]
    box.send_keys("Name a colour.")
    # base vs fine-tuned by default (the random base model answers with newlines only: its text is blank)
    (left, _), (right, answer) = compare_answers(browser, "base", "adapter")
    browser.save_screenshot(str(ARTIFACTS / "side_by_side.png"))
    assert int(left.split()[1]) > 0 and int(right.split()[1]) > 0 and answer.strip()  # "<mode>: N tokens in ..."
    # the adapter merged in memory is the same model: the same greedy answer on the left
    choose(browser, "sbs-mode-a", "merge_and_unload")
    (left, left_answer), (right, right_answer) = compare_answers(browser, "merge_and_unload", "adapter")
    assert left_answer == right_answer and left_answer.strip()


def test_runs_page_lists_the_run_and_its_eval_loss(browser, outputs):
    from selenium.webdriver.common.by import By

    metrics = json.loads((outputs / "tiny" / "run1" / "metrics.json").read_text())
    open_tab(browser, "Runs")
    table = wait_for(lambda: "tiny/run1" in text_of(browser, "runs-table") and text_of(browser, "runs-table"),
                     what="the run in the runs table")
    assert f"{metrics['eval/loss']:.4f}" in table and f"{metrics['eval/loss_before']:.4f}" in table, table
    assert "multirun/demo/0_quantization=none" in table
    choose(browser, "run-open", "tiny/run1")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#run-loss img, #run-loss svg"), what="the loss curve")
    wait_for(lambda: "eval/loss_before" in text_of(browser, "run-metrics"), what="metrics.json")
    browser.save_screenshot(str(ARTIFACTS / "runs.png"))


def test_sweeps_page_shows_the_report(browser):
    from selenium.webdriver.common.by import By

    open_tab(browser, "Sweeps")
    wait_for(lambda: "Sweep report: demo" in text_of(browser, "sweep-summary"), what="the sweep's summary.md")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#sweep-plots img")) >= 3, what="the plots")
    browser.save_screenshot(str(ARTIFACTS / "sweeps.png"))
