"""A real headless Chromium (Debian's `chromium`, installed like promtool if missing)
driven over the DevTools protocol (the `websockets` client the project already has):
open a local page with the network cut off (every request goes to a dead proxy), collect
console errors, uncaught exceptions and failed loads, evaluate a script, take a
screenshot."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from tests.support.system_tools import require_tool


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)
    value: Any = None
    screenshot: bytes | None = None


def chromium() -> str:
    return require_tool("chromium", "chromium")


def open_page(path: Path, script: str, screenshot: bool = False, width: int = 1280, height: int = 1600,
              timeout: float = 60.0) -> PageResult:
    binary = chromium()
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            return _drive(process, path, script, screenshot, width, height, timeout)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _drive(process: subprocess.Popen, path: Path, script: str, screenshot: bool, width: int, height: int,
           timeout: float) -> PageResult:
    deadline = time.monotonic() + timeout
    port = None
    assert process.stderr is not None
    while port is None:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise RuntimeError("chromium exited before its DevTools endpoint was up")
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            port = int(match.group(1))
        if time.monotonic() > deadline:
            raise TimeoutError("chromium's DevTools endpoint")
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
    page = next(t for t in targets if t["type"] == "page")
    result = PageResult()
    with connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
        counter = iter(range(1, 1_000_000))

        def call(method: str, **params: Any) -> dict:
            ident = next(counter)
            ws.send(json.dumps({"id": ident, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv(timeout=max(1.0, deadline - time.monotonic())))
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})
                note(message)

        def note(message: dict) -> None:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.exceptionThrown":
                result.errors.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.errors.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                result.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                result.errors.append(f"load failed: {params.get('errorText')}")
            elif method == "Page.loadEventFired":
                loaded.append(True)

        loaded: list[bool] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            call(f"{domain}.enable")
        call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        call("Page.navigate", url=path.resolve().as_uri())
        while not loaded:
            note(json.loads(ws.recv(timeout=max(1.0, deadline - time.monotonic()))))
        evaluated = call("Runtime.evaluate", expression=script, returnByValue=True)
        if "exceptionDetails" in evaluated:
            result.errors.append(f"script: {evaluated['exceptionDetails'].get('text')}")
        result.value = evaluated.get("result", {}).get("value")
        if screenshot:
            result.screenshot = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
    return result
