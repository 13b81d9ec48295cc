"""The console in a real browser (Debian's Chromium driven by Playwright) against a real gateway and two fakes.

One walk through the page, as an operator would: log in (a wrong key first), watch both backends, drain
and undrain one from the page (and be refused draining the last backend of a model), create a managed
key in the page and use it with the `openai` client, revoke it in the page and see the client refused,
kill a fake and see its row turn unhealthy, read the usage table, stream a playground answer that must
be seen partly written before it is complete, ask the RAG route and see the sources it was grounded on
(a real embedded Chroma and the local embedder), look at the traffic charts, and log out (the session's
cookie is then refused, not only forgotten). Each section is saved as
console-*.png at 1280×800 on the way: into a temporary folder, or, with SLUICE_SCREENSHOTS=1, into
docs/img/ (the screenshots in docs/console.md and the README), so a test run does not rewrite them.

A second test audits the login page and every section with axe-core (WCAG 2.1 A and AA), in the light and
the dark colour scheme.

Chromium comes from Debian (`scripts/ensure-system-deps.sh` installs `chromium`); Playwright's own browser
download is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import chromadb
import openai
import pytest
from chromadb.api import ClientAPI
from chromadb.config import Settings
from playwright.async_api import Dialog, Locator, Page, async_playwright, expect

from sluice.app import Gateway
from sluice.cache.embedders import LocalEmbedder
from sluice.testing.fake_vllm import FakeVLLM
from tests.component.test_rag_gateway import CHUNKS, INSTALL, embedded_section, fill
from tests.conftest import API_KEY, StartFake, StartGateway, eventually

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")

ADMIN = "admin-console-browser-0123456789"
SECRET = "k" * 40
HEALTH = {"interval": 0.5, "timeout": 0.5, "discovery_interval": 1}
REFRESH = 2.0  # the page polls /console/api/state this often (sluice/console/traffic.py INTERVAL)
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "img"
TO_DOCS = os.environ.get("SLUICE_SCREENSHOTS") == "1"
IMAGES = DOCS_IMAGES if TO_DOCS else Path(tempfile.mkdtemp(prefix="sluice-console-"))
VIEWPORT = {"width": 1280, "height": 800}


def sections(tmp_path: Path, docs: ClientAPI | None = None) -> dict[str, Any]:
    """The gateway's configuration; with `docs`, the RAG route "docs" over base on that embedded Chroma."""
    return {
        "auth": {"api_keys": [{"name": "ci", "key": API_KEY}], "admin_key": ADMIN, "key_secret": SECRET},
        "database": {"url": f"sqlite:///{tmp_path}/sluice.db"},
        "audit": {"journal_dir": str(tmp_path / "journal")},
        "cache": {"enabled": True, "store": "memory", "semantic": {"enabled": False}},
        "health": HEALTH,
        **({"rag": embedded_section(docs)} if docs is not None else {}),
    }


async def documents(tmp_path: Path) -> ClientAPI:
    """An embedded Chroma holding test_rag_gateway.py's chunks, embedded with the real local model."""
    embedder = LocalEmbedder()
    try:
        vectors = await embedder.embed([text for *_, text in CHUNKS])
    finally:
        await embedder.close()
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    fill(client, vectors)
    return client


def console_url(gw: Gateway) -> str:
    # localhost is a potentially trustworthy origin: Chromium keeps the Secure cookie over plain HTTP there.
    return gw.url.replace("127.0.0.1", "localhost") + "/console"


@contextlib.asynccontextmanager
async def background_traffic(gw: Gateway) -> AsyncIterator[None]:
    """A trickle of requests (streamed and whole, base model and adapter), so the charts have lines."""
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)

    async def one(model: str, n: int) -> None:
        messages = [{"role": "user", "content": f"background question {n % 5}"}]  # repeats: cache hits
        with contextlib.suppress(openai.OpenAIError):
            if n % 2:
                stream = await client.chat.completions.create(
                    model=model, messages=messages, stream=True, temperature=0
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(model=model, messages=messages, temperature=0)

    async def run() -> None:
        n = 0
        while True:
            n += 1
            await asyncio.gather(one("base", n), one("medical", n))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def screenshot(page: Page, name: str, **options: Any) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    await page.mouse.move(0, 0)  # no hover effects in the picture
    await page.screenshot(path=str(IMAGES / f"console-{name}.png"), animations="disabled", caret="hide", **options)


async def log_in(page: Page, key: str) -> None:
    """Submit the login form with `key` (the page then shows the console, or says the key is wrong)."""
    await page.get_by_label("Admin key").fill(key)
    await page.get_by_role("button", name="Log in").click()


async def open_tab(page: Page, name: str) -> None:
    await page.get_by_role("link", name=name, exact=True).click()
    await expect(page.locator(f"#tab-{name.lower()}")).to_be_visible()


def backend_row(page: Page, name: str) -> Locator:
    return page.locator(f'#backends-table tr[data-backend="{name}"]')


async def test_console_in_a_browser(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    started = time.monotonic()
    with_lora = await fake("base", loras=["medical"], itl_ms=40, tokens=30)
    plain = await fake("base", itl_ms=40, tokens=30)
    gw = await gateway([with_lora, plain], **sections(tmp_path, await documents(tmp_path)))
    async with async_playwright() as driver, background_traffic(gw):
        browser = await driver.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = await browser.new_context(viewport=VIEWPORT, color_scheme="light", locale="en-GB",
                                            timezone_id="UTC")  # fmt: skip
        page = await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))

        async def confirm(dialog: Dialog) -> None:  # every confirmation on the page is answered "OK"
            await dialog.accept()

        page.on("dialog", confirm)
        try:
            await walk_through(page, gw, plain_fake=plain)
        finally:
            await browser.close()
        assert problems == [], problems  # no script error on the page
    assert time.monotonic() - started < 90  # a hang, not slowness: two embedder loads and a browser start


async def walk_through(page: Page, gw: Gateway, plain_fake: FakeVLLM) -> None:
    # -- login: a wrong key, then the right one
    await page.goto(console_url(gw))
    login = page.get_by_label("Admin key")
    await expect(login).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    await screenshot(page, "login")
    await log_in(page, "not-the-admin-key")
    await expect(page.get_by_role("alert")).to_have_text("Wrong admin key")
    assert page.url.endswith("#login-failed")
    await log_in(page, ADMIN)
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.get_by_label("Admin key")).to_be_hidden()

    # -- backends: both healthy, the adapter shown on the one that has it
    for name in ("b0", "b1"):
        await expect(backend_row(page, name).locator('[data-col="health"]')).to_have_text("healthy")
    await expect(backend_row(page, "b0").locator('[data-col="models"]')).to_contain_text("medical (LoRA)")
    await expect(backend_row(page, "b1").locator('[data-col="models"]')).not_to_contain_text("medical")

    # -- drain b1 from the page; b0 is then the last backend of "base", so draining it is refused
    await page.get_by_role("button", name="Drain b1").click()
    await expect(backend_row(page, "b1").locator('[data-col="health"]')).to_contain_text("drained")
    await expect(page.get_by_role("button", name="Undrain b1")).to_be_visible()
    await page.get_by_role("button", name="Drain b0").click()
    await expect(page.locator("#backends-error")).to_contain_text("last healthy, undrained backend")
    await expect(backend_row(page, "b0").locator('[data-col="health"]')).to_have_text("healthy")
    await page.get_by_role("button", name="Undrain b1").click()
    await expect(backend_row(page, "b1").locator('[data-col="health"]')).to_have_text("healthy")
    await expect(page.get_by_role("button", name="Drain b1")).to_be_visible()

    # -- keys: create one in the page, use it with the openai client, revoke it in the page
    await open_tab(page, "Keys")
    await page.get_by_label("Name", exact=True).fill("team-console")
    await page.get_by_label("Models").fill("base, medical")
    await page.get_by_label("Requests / minute").fill("600")
    await page.get_by_role("button", name="Create key").click()
    shown = page.locator("#new-key-value")
    await expect(shown).to_have_text(re.compile(r"^sk-sluice-[0-9A-Za-z]{20,}$"))
    await expect(page.locator("#new-key")).to_contain_text("will not be shown again")
    await expect(page.get_by_role("button", name="Copy to clipboard")).to_be_visible()
    key = (await shown.text_content() or "").strip()
    row = page.locator("#keys-table tbody tr", has_text="team-console")
    await expect(row).to_contain_text("active")
    await expect(row).to_contain_text("base, medical")
    await screenshot(page, "keys", mask=[shown], mask_color="#9ca3af")  # keys never go into pictures
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="medical", messages=[{"role": "user", "content": "hello from the new key"}]
        )
        assert answer.choices[0].message.content
        await page.get_by_role("button", name="Done").click()
        await expect(shown).to_have_text("")  # the key leaves the page
        await page.get_by_role("button", name="Revoke team-console").click()
        await expect(row).to_have_count(0)  # revoked keys are listed only on request
        await page.get_by_label("Show revoked keys").check()
        await expect(row).to_contain_text("revoked")
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="medical", messages=[{"role": "user", "content": "again"}])
    finally:
        await client.close()

    # -- kill b1: its row turns unhealthy within a health interval and a refresh
    await open_tab(page, "Backends")
    await plain_fake.close()
    killed = time.monotonic()
    await expect(backend_row(page, "b1").locator('[data-col="health"]')).to_have_text(
        "unhealthy", timeout=(REFRESH + HEALTH["interval"] + HEALTH["timeout"] + 1.5) * 1000
    )
    assert time.monotonic() - killed < REFRESH + HEALTH["interval"] + HEALTH["timeout"] + 1.5
    await expect(backend_row(page, "b0").locator('[data-col="health"]')).to_have_text("healthy")
    await screenshot(page, "backends")

    # -- usage: the audit log's report per key and model, for a chosen period
    await open_tab(page, "Usage")
    await page.get_by_label("Period").select_option("1h")
    usage = page.locator("#usage-table tbody tr", has_text="medical")
    for _ in range(40):  # audit records are written in batches, off the request path
        if await usage.count():
            break
        await page.get_by_role("button", name="Refresh").click()
        await page.wait_for_timeout(250)
    await expect(page.locator("#usage-table tbody tr", has_text="team-console")).to_have_count(1)
    await expect(page.locator("#usage-table tfoot")).to_contain_text("Total")
    await screenshot(page, "usage")

    # -- playground: the answer must be seen growing, with the backend and the cache status
    await open_tab(page, "Playground")
    await page.get_by_label("Model", exact=True).select_option("medical")
    await page.get_by_label("Temperature").fill("0")  # deterministic: the cache looks it up (and misses)
    await page.get_by_label("Message", exact=True).fill("Stream a short answer, please.")
    await page.get_by_role("button", name="Send").click()
    output = page.locator("#play-output")
    samples: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        samples.append(await output.text_content() or "")
        if await output.get_attribute("aria-busy") == "false" and samples[-1]:
            break
        await asyncio.sleep(0.05)
    final = samples[-1]
    assert len(final.split()) >= 20, final
    partial = {s for s in samples if s and s != final}
    assert len(partial) >= 3, samples  # seen at several lengths before it was complete
    assert all(final.startswith(s) for s in partial)
    await expect(page.locator("#play-backend")).to_have_text("b0")  # the only backend with the adapter
    await expect(page.locator("#play-cache")).to_have_text("miss")
    await expect(page.locator("#play-error")).to_be_hidden()
    await screenshot(page, "playground")

    # -- playground on the RAG route: the answer names the chunks it was grounded on
    await page.get_by_label("Model", exact=True).select_option(label="docs (RAG)")
    await page.get_by_label("Message", exact=True).fill(INSTALL)
    await page.get_by_role("button", name="Send").click()
    await expect(output).to_have_attribute("aria-busy", "false", timeout=30_000)  # the embedder may still load
    await expect(page.locator("#play-error")).to_be_hidden()
    await expect(page.locator("#play-grounded")).to_have_text("true")
    await expect(page.locator("#play-served-model")).to_have_text("base")  # the route's base model answered
    sources = page.locator("#play-sources li")
    await expect(page.locator("#play-sources-box")).to_be_visible()
    await expect(sources.first).to_contain_text("Installing Sluice — guides/install.md")
    assert "The office in Lisbon" not in (await page.locator("#play-sources").text_content() or "")
    assert (await output.text_content() or "").strip()

    # -- traffic: charts drawn from a few points; the per-model table lists base model and adapter
    await open_tab(page, "Traffic")
    await page.wait_for_function("() => document.querySelectorAll('#models-table tbody tr[data-model]').length >= 2")
    await eventually(lambda: len(gw.traffic.describe()["points"]) >= 6, timeout=20)  # lines, not dots
    await page.wait_for_timeout(REFRESH * 1000)  # the page has polled since
    await expect(page.locator('#models-table tr[data-model="medical"]')).to_be_visible()
    await expect(page.locator("#chart-rps")).to_have_attribute(
        "aria-label", re.compile(r"^Requests / s: latest requests/s \d")
    )
    await screenshot(page, "traffic")

    # -- log out: the page asks for the key again, and the session's cookie is no credential any more
    (cookie,) = [c for c in await page.context.cookies() if c["name"] == "sluice_console"]
    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_label("Admin key")).to_be_visible()
    assert not [c for c in await page.context.cookies() if c["name"] == "sluice_console"]
    headers = {"Cookie": f"sluice_console={cookie['value']}", "X-Sluice-Console": "1"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/console/api/state", headers=headers) as response,
    ):
        assert response.status == 401  # a copy kept elsewhere is refused too


AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]  # WCAG 2.1 A and AA: labels, names, contrast, roles


async def test_console_meets_wcag_aa_in_light_and_dark(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    """axe-core (the engine behind most accessibility audits) on the login page and every section of the
    console, in the light and the dark colour scheme, with real data in the tables: no WCAG 2.1 A or AA
    violation (missing labels or names, contrast below 4.5:1, misused roles and ARIA)."""
    from axe_playwright_python.async_playwright import Axe

    gw = await gateway([await fake("base", loras=["medical"]), await fake("base")], **sections(tmp_path))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=admin) as session, session.post(
        gw.url + "/admin/keys", json={"name": "team", "models": ["base"]}
    ) as response:
        assert response.status == 201  # the keys table has a row
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    for _ in range(3):  # usage and traffic have rows and lines
        await client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    axe = Axe()
    violations: list[str] = []

    async def audit(page: Page, where: str) -> None:
        results = await axe.run(page, options={"runOnly": {"type": "tag", "values": AXE_TAGS}})
        examined = {rule["id"]: len(rule["nodes"]) for rule in results.response["passes"]}
        assert examined.get("color-contrast", 0) > 10, (where, examined)  # axe ran and read the page's text
        # Violations, and the checks axe could not decide (text over an image, say): both need a look.
        for finding in [*results.response["violations"], *results.response["incomplete"]]:
            targets = [", ".join(node["target"]) for node in finding["nodes"]]
            violations.append(f"{where}: {finding['id']} ({finding['help']}) at {targets}")

    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            for scheme in ("light", "dark"):
                context = await browser.new_context(viewport=VIEWPORT, color_scheme=scheme, locale="en-GB")
                page = await context.new_page()
                await page.goto(console_url(gw))
                await expect(page.get_by_label("Admin key")).to_be_visible()
                await audit(page, f"{scheme} login")
                await log_in(page, ADMIN)
                await expect(backend_row(page, "b0").locator('[data-col="health"]')).to_have_text("healthy")
                await audit(page, f"{scheme} Backends")
                for tab in ("Traffic", "Keys", "Usage", "Playground"):
                    await open_tab(page, tab)
                    if tab == "Keys":
                        await expect(page.locator("#tab-keys")).to_contain_text("team")
                    if tab == "Usage":
                        await expect(page.locator("#tab-usage")).to_contain_text("ci")
                    await audit(page, f"{scheme} {tab}")
                await context.close()
        finally:
            await browser.close()
    assert violations == [], "\n".join(violations)
