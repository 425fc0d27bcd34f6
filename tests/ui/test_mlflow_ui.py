"""The MLflow UI, in a real browser (Debian's chromium, headless), shows a user what a study produced: the link
`mrigen.tune` prints opens the runs table (not MLflow 3's GenAI overview) with the study's parent run naming the
slice store and its trials nested under it; a trial's image grid is among its artifacts and renders; the
registered model's page shows the `champion` alias on the champion version.

Every wait is on a condition (generous timeouts for a busy machine), never on a fixed sleep.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'


@pytest.fixture(scope="module")
def browser(chromium) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, request, tmp_path) -> Iterator:
    """A fresh browser profile per test (nothing remembered, as for a new user), sized like a laptop screen. When the
    test fails, what the browser showed is kept: a screenshot, the URL, the page's errors and its visible text."""
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} {req.failure}"))
    try:
        yield page
        if getattr(request.node, "failed", False):
            page.screenshot(path=str(tmp_path / "failure.png"))
            text = page.locator("body").inner_text(timeout=5_000)[:1500]
            print(f"browser at {page.url}; screenshot {tmp_path / 'failure.png'}\n" + "\n".join(errors[-20:]) +
                  f"\n--- page text ---\n{text}")
    finally:
        context.close()


def row(page, run_id: str):
    """The run's row: AG Grid splits a row into its pinned and scrolling parts, each a [role=row] with the run id."""
    return page.locator(f'[role="row"][row-id="{run_id}"]')


def screenshot(page, where, name: str) -> None:
    """Save where/name when screenshots were asked for (MRIGEN_UI_SCREENSHOTS), without the assistant panel."""
    if where is None:
        return
    close = page.locator('button[aria-label="Close"]')
    if close.count() and close.first.is_visible():
        close.first.click()
        close.first.wait_for(state="hidden")
    where.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(where / name))


def test_printed_link_opens_the_runs_with_the_trials_nested_under_the_study(page, ui_study, screenshot_dir):
    assert ui_study.runs_page.startswith(f"{ui_study.base_url}/#/experiments/{ui_study.experiment_id}/runs")
    page.goto(ui_study.runs_page)
    parent = row(page, ui_study.parent_id)
    parent.first.wait_for()
    assert "/overview" not in page.url and f"/experiments/{ui_study.experiment_id}/runs" in page.url
    assert parent.locator(f"{RUN_NAME_CELL} a").inner_text().strip() == f"{ui_study.study}-study"
    # The Dataset column names the slice store on the parent (it showed "-" before the parent logged the input).
    assert ui_study.store_name in " ".join(parent.all_inner_texts())
    # Collapsed under the parent: no trial is a row of its own until the parent is expanded.
    assert all(row(page, t).count() == 0 for t in ui_study.trial_ids)
    parent.locator(f"{RUN_NAME_CELL} button").click()
    for trial in ui_study.trial_ids:
        row(page, trial).first.wait_for()
    tops = {t: row(page, t).first.bounding_box()["y"] for t in (ui_study.parent_id, *ui_study.trial_ids)}
    assert all(tops[t] > tops[ui_study.parent_id] for t in ui_study.trial_ids)     # listed under their parent
    screenshot(page, screenshot_dir, "ui-runs.png")


def test_a_trial_image_grid_is_among_its_artifacts_and_renders(page, ui_study, screenshot_dir):
    trial = ui_study.trial_ids[0]
    page.goto(f"{ui_study.base_url}/#/experiments/{ui_study.experiment_id}/runs/{trial}/artifacts"
              "?workflowType=machine_learning")
    page.get_by_text("images", exact=True).first.click()
    page.get_by_text(ui_study.grid.removeprefix("images/"), exact=True).click()
    # The preview is an <img> of the artifact that the browser actually decoded (naturalWidth > 0), at its size.
    img = page.locator(f'img[alt="{ui_study.grid}"]')
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                           timeout=TIMEOUT_MS)
    size = img.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert tuple(size) == ui_study.grid_size
    screenshot(page, screenshot_dir, "ui-artifacts.png")


def test_the_model_page_shows_the_champion_alias(page, ui_study, screenshot_dir):
    page.goto(f"{ui_study.base_url}/#/models/{ui_study.model_name}")
    version = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {ui_study.champion_version}",
                                                                  exact=True))
    version.wait_for()
    alias = version.get_by_role("status").filter(has_text="champion")     # the alias tag, "@ champion"
    alias.wait_for()
    assert alias.get_attribute("title") == "champion"
    screenshot(page, screenshot_dir, "ui-model.png")
