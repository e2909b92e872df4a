"""Headless Chromium over the DevTools protocol: enough to open MLflow's UI as a person would, wait until a page has
finished loading, read what it shows and save screenshots. It drives the machine's own browser (Debian: `apt-get
install -y chromium`); nothing is downloaded. Only the UI review (`jobs/review_ui.py`) and its test use it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sd3ray.errors import TrackingError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser(explicit: str | None = None) -> str:
    """The Chromium to drive: `explicit`, $SD3RAY_BROWSER, or the first of BROWSERS on PATH."""
    for name in (explicit, os.environ.get("SD3RAY_BROWSER"), *BROWSERS):
        if name and (found := shutil.which(name)):
            return found
    raise TrackingError("no Chromium found (looked for " + ", ".join(BROWSERS) + "); install it (Debian: apt-get "
                        "install -y chromium) or name it with --browser / $SD3RAY_BROWSER")


def stop_session(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a process started with `start_new_session=True` and everything in its process group."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Browser:
    """One headless Chromium with one page. `with Browser() as page: page.open(url); page.screenshot(path)`."""

    def __init__(self, executable: str | None = None, width: int = 1600, height: int = 1000,
                 start_timeout_s: float = 60.0) -> None:
        self.executable, self.width, self.height = find_browser(executable), width, height
        self.start_timeout_s = start_timeout_s
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._requests: dict[str, str] = {}  # the page's requests in flight: id -> URL
        self._last_request_event = time.monotonic()  # when one last started or ended

    def __enter__(self) -> Browser:
        self._profile = Path(tempfile.mkdtemp(prefix="sd3ray-browser-"))
        flags = ["--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                 "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MB, too little for a page
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}"]
        if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
            flags.append("--no-sandbox")
        self._proc = subprocess.Popen([self.executable, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self._loop.run_until_complete(self._connect())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "_session", None) is not None:
            self._loop.run_until_complete(self._close())
        stop_session(self._proc)  # the browser and its helpers share its session's process group
        self._loop.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _connect(self) -> None:
        import aiohttp

        port_file = self._profile / "DevToolsActivePort"  # Chromium writes its port here once it listens
        deadline = time.monotonic() + self.start_timeout_s
        while not port_file.is_file() or not port_file.read_text().strip():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise TrackingError(f"{self.executable} did not start a DevTools endpoint within "
                                    f"{self.start_timeout_s:g} s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as reply:
            target = json.loads(await reply.text())
        self._ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        await self._call("Page.enable")
        await self._call("Network.enable")  # its events say which requests are in flight (see `settle`)
        await self._call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                         deviceScaleFactor=1, mobile=False)

    async def _close(self) -> None:
        await self._ws.close()
        await self._session.close()
        self._session = None

    async def _call(self, method: str, **params: Any) -> dict:
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive between replies, in order: the network's are counted, the rest not needed
            message = json.loads((await self._ws.receive()).data)
            if message.get("method", "").startswith("Network."):
                self._track_request(message["method"], message.get("params", {}))
            if message.get("id") == call_id:
                if "error" in message:
                    raise TrackingError(f"the browser refused {method}: {message['error'].get('message')}")
                return message.get("result", {})

    def _track_request(self, event: str, params: dict) -> None:
        if event == "Network.requestWillBeSent":
            if not params.get("loaderId"):  # a worker's own script: it finishes in the worker, unheard of here
                return
            self._requests[params["requestId"]] = params.get("request", {}).get("url", "")
        elif event in ("Network.loadingFinished", "Network.loadingFailed"):
            self._requests.pop(params["requestId"], None)
        else:
            return
        self._last_request_event = time.monotonic()

    def call(self, method: str, **params: Any) -> dict:
        return self._loop.run_until_complete(self._call(method, **params))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise TrackingError(f"the page could not evaluate {expression[:80]!r}: "
                                f"{result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Load `url` afresh. A link into a single-page app that differs only after '#' would otherwise be a
        same-page navigation, which the app may overwrite with a redirect it still has pending."""
        self.call("Page.navigate", url="about:blank")
        self._requests.clear()  # the blank page's navigation cancelled whatever the last page had in flight
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, timeout_s: float = 60.0) -> Any:
        """Poll `expression` until it is truthy; its value. A page that never shows `what` is an error naming it."""
        deadline = time.monotonic() + timeout_s
        while True:
            if value := self.evaluate(expression):
                return value
            if time.monotonic() > deadline:
                raise TrackingError(f"the page did not show {what} within {timeout_s:g} s "
                                    f"(at {self.evaluate('location.href')})")
            time.sleep(0.25)

    def settle(self, busy: str, timeout_s: float = 60.0, quiet_s: float = 1.5) -> str:
        """Wait until the page has finished loading: its document complete, no request in flight and the JavaScript
        expression `busy` (what the page itself shows while it loads: '' when nothing) empty, all three for `quiet_s`
        on end (a single-page app fetches in waves, with short pauses between them). '' once it has; else what was
        still loading when `timeout_s` ran out."""
        deadline, quiet_since = time.monotonic() + timeout_s, None
        while True:
            loading = [self.evaluate(f"document.readyState === 'complete' ? ({busy}) || '' : 'the document'")]
            if self._requests:
                urls = sorted({url.split("?")[0] for url in self._requests.values()})
                loading.append(f"{len(self._requests)} request(s) in flight ({', '.join(urls[:3])})")
            state, now = ", ".join(filter(None, loading)), time.monotonic()
            if state:
                quiet_since = None
            else:
                quiet_since = quiet_since or now
                if now - max(quiet_since, self._last_request_event) >= quiet_s:
                    return ""
            if now > deadline:
                return state or "requests that kept starting"
            time.sleep(0.25)

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates (CSS pixels), as the mouse makes it: move, press, release."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
