"""Chromium: the workbench can be driven by the keyboard alone, with a visible focus, and every
page fits laptop and large-screen widths without sideways scrolling."""
from __future__ import annotations

import pytest

from tests.browser import running_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WIDTHS = [(1280, 800), (1440, 900), (1920, 1080), (2560, 1440)]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("layout")) as base:
        yield base


def tab_to(page, selector: str, limit: int = 120) -> None:
    """Press Tab until the focused element matches ``selector``; fail if it never does."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
    pytest.fail(f"{limit} Tab presses never reached {selector}")


def focus_is_visible(page) -> bool:
    return page.evaluate("""() => {
        const style = getComputedStyle(document.activeElement);
        return (style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0)
            || style.boxShadow !== 'none';
    }""")


def test_a_job_can_be_run_from_the_keyboard_alone(demo_server, chromium):
    page = chromium.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(demo_server + "/")

    tab_to(page, "button.sample")
    assert focus_is_visible(page), "the focused sample button shows no focus ring"
    page.keyboard.press("Enter")                            # adds the sample photo
    page.wait_for_selector(".thumb[data-image-id]", timeout=30_000)

    tab_to(page, "input[name=method][value=grad_cam]")
    assert focus_is_visible(page), "the focused checkbox shows no focus ring"
    page.keyboard.press("Space")
    assert page.is_checked("input[name=method][value=grad_cam]")

    tab_to(page, "#run-button")
    assert focus_is_visible(page), "the focused Run button shows no focus ring"
    page.keyboard.press("Enter")
    page.wait_for_url("**/jobs/*", timeout=30_000)
    page.wait_for_selector("#job[data-finished=true]", timeout=120_000)
    assert page.text_content("#job-status") == "done"

    tab_to(page, "a.cell")                                  # results are keyboard-usable too
    assert focus_is_visible(page), "the focused grid cell shows no focus ring"
    page.keyboard.press("Enter")                            # opens its panel in place
    page.wait_for_selector(".view.detail.open")
    tab_to(page, ".view.open .opacity-slider")
    before = page.input_value(".view.open .opacity-slider >> nth=0")
    page.keyboard.press("ArrowRight")
    assert float(page.input_value(".view.open .opacity-slider >> nth=0")) > float(before)
    page.close()
    assert errors == []


def test_every_page_fits_laptop_and_large_screens(demo_server, chromium):
    page = chromium.new_page()
    page.goto(demo_server + "/")
    page.click("button.sample")
    page.wait_for_selector(".thumb[data-image-id]", timeout=30_000)
    page.check("input[name=method][value=grad_cam]")
    page.check("input[name=method][value=saliency]")
    page.click("#run-button")
    page.wait_for_url("**/jobs/*", timeout=30_000)
    page.wait_for_selector("#job[data-finished=true]", timeout=120_000)
    job_url = page.url

    for width, height in WIDTHS:
        page.set_viewport_size({"width": width, "height": height})
        for url in (demo_server + "/", job_url, demo_server + "/models"):
            page.goto(url)
            page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
            overflow = page.evaluate("""() => {
                const root = document.documentElement;
                const wide = Array.from(document.querySelectorAll('main *'))
                    .filter(e => e.getBoundingClientRect().right > root.clientWidth + 1)
                    .slice(0, 3).map(e => e.tagName + '.' + e.className);
                return {scroll: root.scrollWidth, client: root.clientWidth, wide};
            }""")
            assert overflow["scroll"] <= overflow["client"] and not overflow["wide"], (
                f"{url} at {width}x{height}: {overflow}")
            main = page.evaluate("document.querySelector('main').getBoundingClientRect().width")
            assert main >= min(width, 1100) * 0.8, f"{url} at {width}px uses only {main:.0f} px"
    page.close()
