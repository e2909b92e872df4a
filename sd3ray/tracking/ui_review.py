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
# the part of an element's box (0..1) inside the window and inside every box that clips it (a card's own scroll
# area, the page's), and the centre of that part
IN_VIEW_JS = """(e => { const box = e.getBoundingClientRect();
  let [left, top, right, bottom] = [Math.max(box.left, 0), Math.max(box.top, 0), Math.min(box.right, innerWidth),
                                    Math.min(box.bottom, innerHeight)];
  for (let a = e.parentElement; a; a = a.parentElement) {
    const style = getComputedStyle(a);
    if (style.overflowX === 'visible' && style.overflowY === 'visible') continue;
    const clip = a.getBoundingClientRect();
    [left, top, right, bottom] = [Math.max(left, clip.left), Math.max(top, clip.top), Math.min(right, clip.right),
                                  Math.min(bottom, clip.bottom)];
  }
  const area = box.width * box.height;
  return {part: area > 0 ? Math.max(0, right - left) * Math.max(0, bottom - top) / area : 0,
          x: (left + right) / 2, y: (top + bottom) / 2}; })"""
# an image card's picture as a person sees it: "state" is "image" once its picture has loaded, "empty" when the
# card says NO_IMAGE, "loading" before; "shown" its part in view, "covered" whether something else is drawn at the
# centre of that part
GRID_JS = f"""(key => {{ const card = {CARD_JS}(key);
  const none = state => ({{state, shown: 0, width: 0, height: 0, covered: false}});
  if (!card) return none('loading');
  if (card.innerText.includes({json.dumps(NO_IMAGE)})) return none('empty');
  const img = card.querySelector('img');
  if (!img || !img.complete || img.naturalWidth === 0) return none('loading');
  const box = img.getBoundingClientRect(), view = {IN_VIEW_JS}(img);
  const hit = view.part > 0 ? document.elementFromPoint(view.x, view.y) : img;
  return {{state: 'image', shown: view.part, width: Math.round(box.width), height: Math.round(box.height),
           covered: !(hit === img || img.contains(hit)) || getComputedStyle(img).visibility !== 'visible'}};
  }})(%s)"""
# what MLflow's UI draws while it loads, in view: its design system's skeletons and spinning spinners, and the
# whole-page "Page loading..." spinner; '' when none
LOADING_JS = f"""(() => {{ const count = (selector, test = () => true) => [...document.querySelectorAll(selector)]
    .filter(test).filter(e => {IN_VIEW_JS}(e).part > 0).length;
  const found = [[count('[class*="-skeleton"]', e => [...e.classList].some(c => c.endsWith('-skeleton'))), 'skeleton'],
                 [count('[class*="-spin-spinning"], img[alt="Page loading..."]'), 'spinner']];
  return found.filter(([n]) => n).map(([n, what]) => `${{n}} ${{what}}${{n > 1 ? 's' : ''}} in view`).join(', ');
  }})()"""
SLIDER_JS = f"""(key => {{ const card = {CARD_JS}(key); return card && card.querySelector('[role=slider]'); }})(%s)"""
SLIDER_END_JS = f"""(() => {{ const track = {SLIDER_JS}.closest('[data-orientation=horizontal][dir]');
  const box = track.getBoundingClientRect(); return [box.right - 2, box.top + box.height / 2]; }})()"""
MIN_GRID_PX = 128  # a grid drawn smaller than this on a side is a thumbnail, not a picture to read digits from
# The part of the grid's picture that must be in view. Not all of it: MLflow's image card scrolls its content in an
# area about as tall as the picture (250 px at the review's 1600×1000), with the run's name and params above the
# picture (3.18 also centres it in a taller grey box), so even a run without params shows 84-88% of it; at least
# half means the card shows a picture, not text.
MIN_SHOWN = 0.5


@dataclass
class GridView:
    """An image card's picture as the screen showed it."""

    state: str = "missing"  # "image" (loaded), "empty" (no image at this step), "loading" (neither in time)
    shown: float = 0.0  # the part of the picture inside the window and every box that clips it, 0..1
    width: int = 0  # its size on screen, CSS px
    height: int = 0
    covered: bool = False  # something else is drawn at its centre

    @property
    def visible(self) -> bool:
        return not self.why_not()

    def why_not(self) -> str:
        """Why a person does not see the picture; '' when they do."""
        if self.state != "image":
            return {"empty": f"the card says {NO_IMAGE!r}", "loading": "its picture never loaded"}.get(
                self.state, "there is no such card")
        if self.shown < MIN_SHOWN:
            return (f"{self.shown:.0%} of its picture is in view (the rest is outside the card's scroll area or the "
                    f"window)")
        if self.covered:
            return "something is drawn over its picture"
        if min(self.width, self.height) < MIN_GRID_PX:
            return f"its picture is drawn {self.width}×{self.height} px"
        return ""


@dataclass
class UiReview:
    """What the UI showed for one run."""

    experiment_view: str = ""  # "training" or "genai": the view the experiment's link opened
    sections: list[str] = field(default_factory=list)  # the run's metric sections, top to bottom
    first_chart: str = ""  # SECTION/TITLE of the first chart on the run's Model metrics tab
    grid_at_open: GridView = field(default_factory=GridView)  # the grid's card once scrolled to, as the page opens
    latest_grid_step: int = 0  # the step the card shows after one click at its slider's end (0: none)
    latest_grid: GridView = field(default_factory=GridView)  # the card after that click
    still_loading: dict[str, str] = field(default_factory=dict)  # screenshot -> what was loading when it was taken
    screenshots: list[Path] = field(default_factory=list)

    def problems(self, first_chart: str = "loss/train", latest_step: int = 0) -> list[str]:
        """What a person would trip over, one line each; empty when the run reads as it should."""
        found = [f"the page of {shot} had not finished loading ({what})" for shot, what in self.still_loading.items()]
        if self.experiment_view != "training":
            found.append(f"the experiment opened in MLflow's {self.experiment_view or 'unknown'} view, not the "
                         f"training view")
        if self.first_chart != first_chart:
            found.append(f"the first chart is {self.first_chart or 'missing'}, not {first_chart}")
        if not self.grid_at_open.visible:
            found.append(f"the sample grid's card shows no picture when the page opens: "
                         f"{self.grid_at_open.why_not()}")
        if latest_step and self.latest_grid_step != latest_step:
            found.append(f"one click on the grid's slider shows step {self.latest_grid_step}, not the latest "
                         f"({latest_step})")
        elif self.latest_grid_step and not self.latest_grid.visible:
            found.append(f"after one click on the grid's slider the card shows no picture: "
                         f"{self.latest_grid.why_not()}")
        return found


def review_run(ui_base: str, experiment_id: str, run_id: str, out_dir: Path, grid_key: str = "samples/grid",
               experiment_link: str | None = None, timeout_s: float = 120.0) -> UiReview:
    """Open the experiment (at `experiment_link`, by default the link sd3ray prints) and the run's Model metrics
    tab in headless Chromium; each screenshot, in `out_dir`, is taken once its page has finished loading."""
    review = UiReview()
    with Browser() as page:

        def shoot(name: str) -> None:
            if what := page.settle(LOADING_JS, timeout_s):
                review.still_loading[name] = what
            review.screenshots.append(page.screenshot(out_dir / name))

        page.open(experiment_link or ui_url(ui_base, experiment_id))
        review.experiment_view = page.wait_for(VIEW_JS, "the experiment's sidebar", timeout_s)
        if review.experiment_view == "training":  # the GenAI view lists no runs
            page.wait_for(f"document.querySelector('a[href*=\"/runs/{run_id}\"]') !== null",
                          "the run in the experiment's runs table", timeout_s)
        shoot("experiment.png")

        page.open(ui_url(ui_base, experiment_id, run_id, "model-metrics"))
        page.wait_for(f"document.querySelector('{CARD} svg.main-svg') !== null", "the run's charts drawn", timeout_s)
        shoot("metrics.png")
        review.sections = page.evaluate(SECTIONS_JS)
        review.first_chart = f"{review.sections[0]}/{page.evaluate(FIRST_CARD_JS)}" if review.sections else ""

        section = grid_key.split("/")[0]
        if section in review.sections:  # scroll to the grids, as a person would
            page.evaluate(f"{SECTION_JS}({json.dumps(section)}).header.scrollIntoView()")
            key = json.dumps(grid_key)
            page.wait_for(f"{GRID_JS % key}.state !== 'loading'", "the sample grid's card", timeout_s)
            page.evaluate(f"{CARD_JS}({key}).scrollIntoView()")
            shoot("grid.png")
            review.grid_at_open = GridView(**page.evaluate(GRID_JS % key))
            x, y = page.evaluate(SLIDER_END_JS % key)  # one click at the slider's far end: the latest grid
            page.click(x, y)
            latest = page.wait_for(f"(() => {{ const s = {SLIDER_JS % key}; return s && s.getAttribute("
                                   f"'aria-valuenow') === s.getAttribute('aria-valuemax') && "
                                   f"{GRID_JS % key}.state === 'image' ? Number(s.getAttribute('aria-valuenow')) "
                                   f": 0; }})()", "the latest grid after a click on the slider's end", timeout_s)
            review.latest_grid_step = int(latest)
            shoot("latest-grid.png")
            review.latest_grid = GridView(**page.evaluate(GRID_JS % key))
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
