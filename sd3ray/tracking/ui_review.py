"""A run reviewed in MLflow's UI as a person sees it: open the experiment and the run's charts in a real browser
(`sd3ray.tracking.browser`), read which view opened, which chart comes first and whether the sample grid shows, and
save a screenshot of each page. `jobs/review_ui.py` runs it; a test holds sd3ray's links and metric keys to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sd3ray.errors import TrackingError
from sd3ray.storage import redact
from sd3ray.tracking.browser import Browser, stop_session
from sd3ray.tracking.mlflow_tracker import WITHOUT_JOB_RUNNERS, ui_url
from sd3ray.tracking.protocol import EVAL_SECONDS

# The UI's own markers (MLflow 3.17): the sidebar of the training view links the model registry, the GenAI view's
# does not; metric sections and chart cards carry these test ids.
VIEW_JS = """(() => { const links = [...document.querySelectorAll('aside a')].map(a => a.getAttribute('href') || '');
  if (!links.some(h => h.includes('/experiments/'))) return '';
  return links.includes('#/models') ? 'training' : 'genai'; })()"""
SECTION = "[data-testid=experiment-view-compare-runs-section-header]"
CARD = "[data-testid=experiment-view-compare-runs-card]"
SECTIONS_JS = f"""[...document.querySelectorAll('{SECTION}')].map(e => e.innerText.split('\\n')[0].trim())"""
FIRST_CARD_JS = f"""(() => {{ const card = document.querySelector('{CARD}');
  return card ? card.innerText.split('\\n')[0].trim() : ''; }})()"""
NO_IMAGE = "No image logged at this step"
# a section by title: its header, and its grid of cards (the first after the header, before the next header)
SECTION_JS = f"""(name => {{
  const title = e => e.innerText.split('\\n')[0].trim();
  const headers = [...document.querySelectorAll('{SECTION}')];
  const i = headers.findIndex(h => title(h) === name);
  const after = (a, b) => a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING;
  const grid = [...document.querySelectorAll('[data-testid=draggable-chart-cards-grid]')].find(g =>
    after(headers[i], g) && (!headers[i + 1] || after(g, headers[i + 1])));
  return {{header: headers[i], grid}}; }})"""
# a chart or image card by its title (an image card's title is its whole key, e.g. samples/grid)
CARD_JS = f"""(key => [...document.querySelectorAll('{CARD}')].find(c => c.innerText.split('\\n')[0].trim() === key))"""
# an image card's state: "image" once its picture has loaded, "empty" when it says NO_IMAGE, "" while neither
GRID_STATE_JS = f"""(key => {{ const card = {CARD_JS}(key);
  if (!card) return '';
  if (card.innerText.includes({json.dumps(NO_IMAGE)})) return 'empty';
  const img = card.querySelector('img');
  return img && img.complete && img.naturalWidth > 0 ? 'image' : ''; }})(%s)"""
SLIDER_JS = f"""(key => {{ const card = {CARD_JS}(key); return card && card.querySelector('[role=slider]'); }})(%s)"""
SLIDER_END_JS = f"""(() => {{ const track = {SLIDER_JS}.closest('[data-orientation=horizontal][dir]');
  const box = track.getBoundingClientRect(); return [box.right - 2, box.top + box.height / 2]; }})()"""


@dataclass
class UiReview:
    """What the UI showed for one run."""

    experiment_view: str = ""  # "training" or "genai": the view the experiment's link opened
    sections: list[str] = field(default_factory=list)  # the run's metric sections, top to bottom
    first_chart: str = ""  # SECTION/TITLE of the first chart on the run's Model metrics tab
    grid_at_open: bool = False  # the grid's card shows an image as the page opens (not "No image logged ...")
    latest_grid_step: int = 0  # the step the card shows after one click at its slider's end (0: none)
    screenshots: list[Path] = field(default_factory=list)

    def problems(self, first_chart: str = "loss/train", latest_step: int = 0) -> list[str]:
        """What a person would trip over, one line each; empty when the run reads as it should."""
        found = []
        if self.experiment_view != "training":
            found.append(f"the experiment opened in MLflow's {self.experiment_view or 'unknown'} view, not the "
                         f"training view")
        if self.first_chart != first_chart:
            found.append(f"the first chart is {self.first_chart or 'missing'}, not {first_chart}")
        if not self.grid_at_open:
            found.append("the sample grid's card shows no image when the page opens")
        if latest_step and self.latest_grid_step != latest_step:
            found.append(f"one click on the grid's slider shows step {self.latest_grid_step}, not the latest "
                         f"({latest_step})")
        return found


def review_run(ui_base: str, experiment_id: str, run_id: str, out_dir: Path, grid_key: str = "samples/grid",
               experiment_link: str | None = None, timeout_s: float = 120.0) -> UiReview:
    """Open the experiment (at `experiment_link`, by default the link sd3ray prints) and the run's Model metrics
    tab in headless Chromium; screenshots go to `out_dir`."""
    review = UiReview()
    with Browser() as page:
        page.open(experiment_link or ui_url(ui_base, experiment_id))
        review.experiment_view = page.wait_for(VIEW_JS, "the experiment's sidebar", timeout_s)
        review.screenshots.append(page.screenshot(out_dir / "experiment.png"))

        page.open(ui_url(ui_base, experiment_id, run_id, "model-metrics"))
        page.wait_for(f"document.querySelector('{CARD} svg.main-svg') !== null", "the run's charts drawn", timeout_s)
        review.sections = page.evaluate(SECTIONS_JS)
        review.first_chart = f"{review.sections[0]}/{page.evaluate(FIRST_CARD_JS)}" if review.sections else ""
        review.screenshots.append(page.screenshot(out_dir / "metrics.png"))

        section = grid_key.split("/")[0]
        if section in review.sections:  # scroll to the grids, as a person would
            page.evaluate(f"{SECTION_JS}({json.dumps(section)}).header.scrollIntoView()")
            key = json.dumps(grid_key)
            review.grid_at_open = page.wait_for(GRID_STATE_JS % key, "the sample grid's card", timeout_s) == "image"
            page.evaluate(f"{CARD_JS}({key}).scrollIntoView()")
            review.screenshots.append(page.screenshot(out_dir / "grid.png"))
            x, y = page.evaluate(SLIDER_END_JS % key)  # one click at the slider's far end: the latest grid
            page.click(x, y)
            latest = page.wait_for(f"(() => {{ const s = {SLIDER_JS % key}; return s && s.getAttribute("
                                   f"'aria-valuenow') === s.getAttribute('aria-valuemax') && "
                                   f"{GRID_STATE_JS % key} === 'image' ? Number(s.getAttribute('aria-valuenow')) "
                                   f": 0; }})()", "the latest grid after a click on the slider's end", timeout_s)
            review.latest_grid_step = int(latest)
            review.screenshots.append(page.screenshot(out_dir / "latest-grid.png"))
    return review


@contextlib.contextmanager
def ui_for(uri: str, start_timeout_s: float = 120.0) -> Iterator[str]:
    """The UI's address for a tracking URI: a server's own, or an `mlflow ui` started here on a free loopback port
    for a database or folder store (and stopped afterwards)."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], env={**WITHOUT_JOB_RUNNERS, **os.environ},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise TrackingError(f"mlflow ui --backend-store-uri {redact(uri)} did not start") from None
                time.sleep(0.5)
        yield base
    finally:
        stop_session(server, grace_s=20)


def latest_eval_step(uri: str, run_id: str) -> int:
    """The run's last evaluation step: where its newest grid is."""
    from mlflow.tracking import MlflowClient

    return max((m.step for m in MlflowClient(uri).get_metric_history(run_id, EVAL_SECONDS)), default=0)
