"""Follow training in Chromium, on a directory of tiny colour-classifier checkpoints (a model that
sleeps 0.2 s per forward pass, so a timeline runs for a couple of seconds).

The page opens while the timeline runs and the finished timeline is swapped in without a
reload. Then Follow training is ticked and the training run writes a new checkpoint: the page
extends the timeline by itself and swaps the extended one in -- a new frame for the new
checkpoint in the filmstrip, the new timeline's address in the address bar, and no navigation
(the page's JavaScript state survives). The extended timeline computed only the new
checkpoint; the earlier ones came from the store. A checkpoint written just before the
extension was asked for, which the server had not listed yet, is added next."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.browser import ARTIFACTS, page_problems, running_server, wait_until
from tests.datasets.models import CLASS_NAMES, COLOURS, colour_image
from tests.timeline.training import SIDE, STEPS_PER_EPOCH

pytestmark = [pytest.mark.browser]


def _save_epoch(directory: Path, epoch: int, state: dict, age_s: float = 0.0) -> str:
    file = f"epoch_{epoch:02d}.pt"
    torch.save({"epoch": epoch, "global_step": (epoch + 1) * STEPS_PER_EPOCH,
                "state_dict": state}, directory / file)
    if age_s:
        stamp = time.time() - age_s
        os.utime(directory / file, (stamp, stamp))
    return file


def _png(colour: str, mix: str, seed: int) -> bytes:
    pixels = colour_image(np.random.default_rng(seed), COLOURS[colour], mix=COLOURS[mix],
                          amount=0.35, side=SIDE)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_follow_training_adds_a_new_checkpoint_in_place(chromium, tmp_path: Path,
                                                         epoch_states: list) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "convscope.toml").write_text(
        '[model]\nfactory = "tests.datasets.models:SlowColourNet"\n'
        f"[preprocess]\ninput_size = [{SIDE}, {SIDE}]\nresize = 0\n"
        "mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n", encoding="utf-8")
    (run / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
    first_files = [_save_epoch(run, epoch, epoch_states[epoch], age_s=300 - 100 * epoch)
                   for epoch in range(2)]

    with running_server(tmp_path, [str(run)]) as base, \
            chromium.new_page(viewport={"width": 1200, "height": 900}) as page:
        problems = page_problems(page)
        api = page.request
        uploaded = api.post(base + "/api/v1/images", multipart={
            "image": {"name": "orange.png", "mimeType": "image/png",
                      "buffer": _png("red", "yellow", 1)}})
        assert uploaded.status == 201, uploaded.text()
        teal = api.post(base + "/api/v1/images", multipart={
            "image": {"name": "teal.png", "mimeType": "image/png",
                      "buffer": _png("green", "blue", 2)}})
        images = [uploaded.json()["images"][0]["id"], teal.json()["images"][0]["id"]]
        # A fixed target: "predicted" follows the last checkpoint, and a new last checkpoint
        # that predicts another class would rightly recompute every map. Two images x two
        # checkpoints of the slow model: about two seconds of forward passes.
        created = api.post(base + "/api/v1/timelines", data={
            "images": images, "visualizations": [{"name": "grad_cam"}], "targets": ["red"]})
        assert created.status == 202, created.text()
        first = created.json()

        page.goto(base + first["url"])
        # Playwright's framenavigated also reports history.replaceState (a same-document
        # navigation); Chromium's own events tell a document load (Page.frameNavigated) from
        # an address change within the document (Page.navigatedWithinDocument).
        navigations: list[str] = []
        page.on("framenavigated", lambda frame: frame == page.main_frame
                and navigations.append(frame.url))
        devtools = page.context.new_cdp_session(page)
        devtools.send("Page.enable")
        document_loads: list[str] = []
        devtools.on("Page.frameNavigated", lambda event: document_loads.append(
            event["frame"]["url"]))
        within_document: list[str] = []
        devtools.on("Page.navigatedWithinDocument", lambda event: within_document.append(
            event["url"]))
        page.evaluate("() => { window.__marker = 1; }")

        # Opened while it runs; the finished timeline replaces the progress in place.
        assert page.get_attribute("#timeline", "data-finished") == "false"
        page.wait_for_selector("#timeline[data-finished=true]", timeout=30_000)
        assert page.text_content("#timeline-status") == "done"
        frames = page.locator("figure.filmstrip").first.locator("li.frame")
        assert frames.count() == 2
        assert page.evaluate("() => window.__marker") == 1 and document_loads == []

        page.check("#follow-training")
        assert page.url == base + first["url"] + "?follow=1"
        new_file = _save_epoch(run, 2, epoch_states[2])     # the training run goes on
        wait_until(lambda: frames.count() == 3, 30, "a third frame in the filmstrip")

        assert [new_file in frames.nth(n).text_content() for n in range(3)] == \
            [False, False, True]
        assert all(name in frames.nth(n).text_content() for n, name in enumerate(first_files))
        wait_until(lambda: frames.nth(2).locator("img").evaluate(
            "img => img.complete && img.naturalWidth > 0"), 10, "the new frame to load")
        assert page.locator("figure.filmstrip").count() == 2           # both images
        assert page.evaluate("() => window.__marker") == 1
        assert document_loads == [], document_loads
        new_url = page.get_attribute("#timeline", "data-url")
        assert new_url != first["url"]
        assert page.url == base + new_url + "?follow=1"
        # The only address changes: ticking the box, then the extended timeline's address.
        changes = [base + first["url"] + "?follow=1", page.url]
        assert within_document == changes and navigations == changes, (within_document,
                                                                       navigations)
        assert page.is_checked("#follow-training")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "timeline-follow-chromium.png"))
        assert page.text_content("h1").strip() == "Timeline \u00b7 3 checkpoints"

        extended = api.get(base + page.get_attribute("#timeline", "data-api-url")).json()
        assert extended["status"] == "done"
        assert [c["file"] for c in extended["checkpoints"]] == [*first_files, new_file]
        # Only the new checkpoint ran the model (per image its prediction and its Grad-CAM
        # map); both for each earlier checkpoint came from the store.
        assert extended["model_runs"] == 2 * len(images)
        assert extended["cache_hits"] >= 2 * len(images) * len(first_files)
        assert page.text_content("#model-runs") == str(2 * len(images))

        # A checkpoint the server lists only after the extension was asked for (written just
        # before it, listed once it settled) is new all the same: it is added too.
        later_file = _save_epoch(run, 3, epoch_states[3])
        stamp = extended["created"] - 1
        os.utime(run / later_file, (stamp, stamp))
        wait_until(lambda: frames.count() == 4, 30, "a fourth frame in the filmstrip")
        assert later_file in frames.nth(3).text_content()
        assert page.evaluate("() => window.__marker") == 1 and document_loads == []
        assert page.url == base + page.get_attribute("#timeline", "data-url") + "?follow=1"
        assert problems == []
